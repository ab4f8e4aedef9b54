import Foundation

#if FUZZING
  import CFuzzSupport
#endif

/// The input handler of this process's fuzz target (libFuzzer's callback is a C function pointer,
/// so it cannot capture it). Set once, before the first input.
nonisolated(unsafe) private var target: ((UnsafeRawBufferPointer) -> Void)? = nil

/// The `main` of every fuzz target: under libFuzzer (`-DFUZZING`, `make fuzz`) it feeds `one`
/// generated inputs; otherwise it replays the files given as arguments (a corpus or a crash).
public func fuzzMain(_ one: @escaping (UnsafeRawBufferPointer) -> Void) -> Never {
  #if FUZZING
    target = one
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    let status = LLVMFuzzerRunDriver(&argc, &argv) { data, size in
      target!(UnsafeRawBufferPointer(start: data, count: size))
      return 0
    }
    exit(status)
  #else
    for path in CommandLine.arguments.dropFirst() {
      let data = FileManager.default.contents(atPath: path) ?? Data()
      data.withUnsafeBytes { one($0) }
    }
    exit(0)
  #endif
}
