import ChunkStore
import Foundation
import NixFormats
@testable import StoreFS
import Testing
import TestSupport

/// The kernel-view journal a successor replays: every number handed out comes back, a torn last
/// record is ignored, another connection's journal is refused.
struct KernelViewTests {
  let a: StorePath
  let b: StorePath

  init() throws {
    a = try StorePath("/nix/store/00000000000000000000000000000001-a")
    b = try StorePath("/nix/store/00000000000000000000000000000002-b")
  }

  @Test func replaysWhatWasAppended() throws {
    let tmp = try TemporaryDirectory("kview")
    let journal = try KernelViewJournal.create(stateDir: tmp.path, connection: "c1")
    journal.instance(1, namespace: 0, path: a)
    journal.instance(2, namespace: 7, path: b)
    let content = ContentID.of(Array("hello".utf8))
    journal.file(42, content: content, size: 5, path: a)
    journal.view(7, StoreView(id: "vol", closure: [b, a], result: b))
    journal.view(8, StoreView(id: "gone", closure: [a], result: a))
    journal.viewRemoved(8)
    let state = try KernelViewJournal.load(stateDir: tmp.path, connection: "c1", storeDir: "/nix/store")
    #expect(state.instances[1]?.path == a && state.instances[1]?.namespace == 0)
    #expect(state.instances[2]?.path == b && state.instances[2]?.namespace == 7)
    #expect(state.files[42]?.content == content && state.files[42]?.size == 5 && state.files[42]?.path == a)
    #expect(state.views[7]?.id == "vol" && state.views[7]?.closure == [a, b] && state.views[7]?.result == b)
    #expect(state.views[8] == nil)

    // Compacted into a new journal (the successor's), one generation on: the same state.
    var next = state
    next.generation += 1
    _ = try KernelViewJournal.create(stateDir: tmp.path, connection: "c1", state: next)
    let again = try KernelViewJournal.load(stateDir: tmp.path, connection: "c1", storeDir: "/nix/store")
    #expect(again.generation == 1)
    #expect(again.instances.count == 2 && again.files.count == 1 && again.views.count == 1)
  }

  @Test func aTornRecordIsIgnoredAndAnotherConnectionRefused() throws {
    let tmp = try TemporaryDirectory("kview-torn")
    let journal = try KernelViewJournal.create(stateDir: tmp.path, connection: "c1")
    journal.instance(1, namespace: 0, path: a)
    journal.instance(2, namespace: 0, path: b)
    let path = KernelViewJournal.path(stateDir: tmp.path)
    let whole = try #require(FileManager.default.contents(atPath: path))
    try whole.prefix(whole.count - 3).write(to: URL(fileURLWithPath: path))
    let state = try KernelViewJournal.load(stateDir: tmp.path, connection: "c1", storeDir: "/nix/store")
    #expect(state.instances[1]?.path == a)
    #expect(state.instances[2] == nil)
    #expect(throws: KernelViewError.self) {
      try KernelViewJournal.load(stateDir: tmp.path, connection: "c2", storeDir: "/nix/store")
    }
    try Data("garbage\n".utf8).write(to: URL(fileURLWithPath: path))
    #expect(throws: KernelViewError.self) {
      try KernelViewJournal.load(stateDir: tmp.path, connection: "c1", storeDir: "/nix/store")
    }
  }
}
