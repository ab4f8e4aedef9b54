import Foundation
import NixFormats

// NAR framing throughput: parse a large in-memory archive, contents passed through untouched.
// Usage: nar-bench [total MiB, default 1024] [repetitions, default 5]

func makeArchive(totalBytes: Int, meanFileSize: Int) throws -> [UInt8] {
  var writer = NARWriter()
  var out: [UInt8] = []
  out.reserveCapacity(totalBytes + totalBytes / 8)
  let payload = [UInt8](repeating: 0xa5, count: 4 << 20)
  var state: UInt64 = 88_172_645_463_325_252
  func next() -> UInt64 {
    state ^= state << 13
    state ^= state >> 7
    state ^= state << 17
    return state
  }
  try writer.write(.directory(name: []))
  var written = 0
  var dir = 0
  while written < totalBytes {
    try writer.write(.directory(name: Array(String(format: "dir%06d", dir).utf8)))
    for f in 0..<64 where written < totalBytes {
      // Log-uniform sizes around the mean, like a real store path.
      let size = min(payload.count, Int(Double(meanFileSize) * exp(Double(next() % 1000) / 1000.0 * 4 - 2)))
      try writer.write(.file(name: Array(String(format: "file%04d", f).utf8), size: UInt64(size), executable: f % 5 == 0, contentOffset: 0))
      try payload.withUnsafeBytes { try writer.write(.data(UnsafeRawBufferPointer(rebasing: $0[0..<size]))) }
      try writer.write(.endFile)
      written += size
      out += writer.take()
    }
    // Entries must be sorted: links ("l…") after files ("f…").
    for l in 0..<4 {
      try writer.write(.symlink(name: Array(String(format: "link%04d", l).utf8), target: Array("file0000".utf8)))
    }
    try writer.write(.endDirectory)
    dir += 1
  }
  try writer.write(.endDirectory)
  out += writer.take()
  return out
}

let args = CommandLine.arguments
let totalMiB = args.count > 1 ? Int(args[1]) ?? 1024 : 1024
let reps = args.count > 2 ? Int(args[2]) ?? 5 : 5
let pieceSize = 1 << 20

// Framing alone hands contents through untouched, so its GB/s grows with file size: the cost that
// matters is per entry, reported as files/s. "+sha256" adds the NarHash verification every fetch does.
for mean in [256 << 10, 16 << 10, 1 << 10] {
  let archive = try makeArchive(totalBytes: (mean >= 16 << 10 ? totalMiB : totalMiB / 8) << 20, meanFileSize: mean)
  for hashing in [false, true] {
    var results: [Double] = []
    var entries = 0
    var seconds: [Double] = []
    for _ in 0..<reps {
      var reader = NARReader(totalSize: UInt64(archive.count))
      var hasher = NixHasher()
      var count = 0
      let start = DispatchTime.now().uptimeNanoseconds
      try archive.withUnsafeBytes { all in
        var i = 0
        while i < all.count {
          let end = min(all.count, i + pieceSize)
          let piece = UnsafeRawBufferPointer(rebasing: all[i..<end])
          if hashing { hasher.update(piece) }
          try reader.feed(piece) { event in
            if case .file = event { count += 1 }
          }
          i = end
        }
      }
      try reader.finish()
      let s = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
      seconds.append(s)
      results.append(Double(archive.count) / s / 1e9)
      entries = count
      if hashing { precondition(hasher.byteCount == UInt64(archive.count)) }
    }
    results.sort()
    seconds.sort()
    print(
      String(
        format: "nar-parse%@ mean-file=%dKiB archive=%.0fMiB files=%d: median %.2f GB/s (min %.2f, max %.2f), %.1f M files/s, %d runs",
        hashing ? "+sha256" : "", mean >> 10, Double(archive.count) / 1048576, entries, results[results.count / 2],
        results.first!, results.last!, Double(entries) / seconds[seconds.count / 2] / 1e6, reps))
  }
}
