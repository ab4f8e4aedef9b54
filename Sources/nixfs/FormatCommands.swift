import ArgumentParser
import Foundation
import NixFormats

struct NarCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "nar", abstract: "Inspect NAR archives.", subcommands: [List.self, Hash.self])

  struct List: ParsableCommand {
    static let configuration = CommandConfiguration(
      commandName: "ls", abstract: "Validate a NAR strictly and list its entries (like `nix nar ls -R`).")
    @Argument(help: "NAR file, or - for standard input.") var file: String

    func run() throws {
      var reader = NARReader()
      var path: [String] = []
      var out = ""
      func show(_ kind: String, _ name: [UInt8], _ extra: String = "") {
        let full = (path + (name.isEmpty ? [] : [String(decoding: name, as: UTF8.self)])).joined(separator: "/")
        out += "\(kind) /\(full)\(extra)\n"
      }
      do {
        try forEachChunk(of: file) { chunk in
          try reader.feed(chunk) { event in
            switch event {
            case .directory(let name):
              show("dir ", name)
              if !name.isEmpty { path.append(String(decoding: name, as: UTF8.self)) }
            case .endDirectory:
              if !path.isEmpty { path.removeLast() }
            case .file(let name, let size, let executable, let offset):
              show(executable ? "exec" : "file", name, " \(size) bytes at \(offset)")
            case .symlink(let name, let target):
              show("link", name, " -> \(String(decoding: target, as: UTF8.self))")
            case .data, .endFile: break
            }
          }
          if out.utf8.count > 1 << 16 {
            print(out, terminator: "")
            out = ""
          }
        }
        try reader.finish()
      } catch {
        print(out, terminator: "")
        fail("\(file): \(error)")
      }
      print(out, terminator: "")
    }
  }

  struct Hash: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Validate a NAR and print its sha256 (the NarHash) and size.")
    @Argument(help: "NAR file, or - for standard input.") var file: String

    func run() throws {
      var reader = NARReader()
      var hasher = NixHasher()
      do {
        try forEachChunk(of: file) { chunk in
          hasher.update(chunk)
          try reader.feed(chunk) { _ in }
        }
        try reader.finish()
      } catch {
        fail("\(file): \(error)")
      }
      print("\(hasher.finalize().nix32) \(hasher.byteCount)")
    }
  }
}

struct NarInfoCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "narinfo", abstract: "Inspect narinfo files.", subcommands: [Verify.self])

  struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Parse a narinfo and check its signature against trusted keys.")
    @Option(name: .customLong("trusted-public-key"), help: "name:base64 (repeatable).")
    var trustedKeys: [String] = []
    @Argument(help: "The .narinfo file.") var file: String

    func run() throws {
      guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { fail("cannot read \(file)") }
      do {
        let info = try NarInfo(parsing: text, source: file)
        let signer = try info.verify(trusting: TrustedKeys(parsing: trustedKeys))
        print("\(info.storePath): NarHash \(info.narHash) NarSize \(info.narSize), signed by \(signer)")
      } catch {
        fail("\(error)")
      }
    }
  }
}
