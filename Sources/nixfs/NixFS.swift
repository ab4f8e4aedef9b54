import ArgumentParser
import Foundation
import NixFormats

@main
struct NixFS: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "nixfs",
    abstract: "A lazy, deduplicated /nix/store for Kubernetes nodes and Linux hosts.",
    version: NixFSVersion.description,
    subcommands: [MountCommand.self, KeeperCommand.self, IdleCommand.self, CSICommand.self, ServeCommand.self, FetchCommand.self] + storeCommands + cacheCommands
      + [NarCommand.self, NarInfoCommand.self]
  )
}

/// Prints one actionable line and exits non-zero: the CLI's single error path.
func fail(_ message: String, code: Int32 = 1) -> Never {
  FileHandle.standardError.write(Data("nixfs: error: \(message)\n".utf8))
  exit(code)
}

/// Reads a file, or standard input for "-", in pieces.
func forEachChunk(of path: String, size: Int = 1 << 20, _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
  let handle: FileHandle
  if path == "-" {
    handle = FileHandle.standardInput
  } else {
    guard let h = FileHandle(forReadingAtPath: path) else { fail("cannot open \(path)") }
    handle = h
  }
  while true {
    let data = handle.readData(ofLength: size)
    if data.isEmpty { break }
    try data.withUnsafeBytes { try body($0) }
  }
}
