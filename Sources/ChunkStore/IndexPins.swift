import Foundation

// The index layer, `pins` table: durable pins by holder.
extension Database {
  func insertPin(_ path: String, holder: String) throws(ChunkStoreError) {
    try prepare("INSERT OR IGNORE INTO pins VALUES(?, ?)").bind(path, holder).run()
  }

  func deletePin(_ path: String, holder: String) throws(ChunkStoreError) {
    try prepare("DELETE FROM pins WHERE store_path = ? AND holder = ?").bind(path, holder).run()
  }

  func deletePins(holder: String) throws(ChunkStoreError) {
    try prepare("DELETE FROM pins WHERE holder = ?").bind(holder).run()
  }

  func pinnedStorePaths() throws(ChunkStoreError) -> [String] {
    let s = try prepare("SELECT DISTINCT store_path FROM pins")
    var out: [String] = []
    while try s.step() { if let t = s.text(0) { out.append(t) } }
    return out
  }
}
