/// FastCDC content-defined chunking (Xia et al., USENIX ATC '16; normalized chunking as in the
/// 2020 TPDS paper): a gear rolling hash, cut-point skipping below the minimum size, and two
/// masks — a harder one (more bits) before the average size and an easier one after it — so chunk
/// sizes cluster around the average. Boundaries depend only on nearby content, so an insertion
/// shifts only the chunks around it.
public struct FastCDC: Sendable, Hashable {
  public let minSize: Int
  public let avgSize: Int
  public let maxSize: Int
  let maskS: UInt64
  let maskL: UInt64

  /// Sizes must satisfy 64 <= min <= avg <= max; avg is rounded to a power of two for the masks.
  public init(minSize: Int = 16 << 10, avgSize: Int = 64 << 10, maxSize: Int = 256 << 10) {
    precondition(64 <= minSize && minSize <= avgSize && avgSize <= maxSize, "FastCDC needs 64 <= min <= avg <= max")
    self.minSize = minSize
    self.avgSize = avgSize
    self.maxSize = maxSize
    let bits = max(Int(log2Floor(UInt64(avgSize))), 2)
    // Normalization level 2: one in 2^(bits+2) positions cuts before avg, 2^(bits-2) after.
    maskS = Self.spreadMask(bits: bits + 2)
    maskL = Self.spreadMask(bits: bits - 2)
  }

  /// `bits` one-bits spread evenly over bits 16...63: the gear hash's high bits depend on the
  /// last ~48 bytes, and spreading them widens the effective window as the paper recommends.
  static func spreadMask(bits: Int) -> UInt64 {
    var mask: UInt64 = 0
    for i in 0..<bits { mask |= 1 << UInt64(63 - (i * 48) / bits) }
    return mask
  }

  /// The length of the next chunk at the start of `data`. `data` must hold at least `maxSize`
  /// bytes unless it is the end of the stream, so results do not depend on how input is split.
  @inline(__always)
  public func cut(_ data: UnsafeRawBufferPointer) -> Int {
    var n = data.count
    if n <= minSize { return n }
    if n > maxSize { n = maxSize }
    let normal = min(avgSize, n)
    var h: UInt64 = 0
    var i = minSize
    let p = data.baseAddress!.assumingMemoryBound(to: UInt8.self)
    return gearTable.withUnsafeBufferPointer { gear -> Int in
      let g = gear.baseAddress!
      while i < normal {
        h = (h << 1) &+ g[Int(p[i])]
        if h & maskS == 0 { return i + 1 }
        i += 1
      }
      while i < n {
        h = (h << 1) &+ g[Int(p[i])]
        if h & maskL == 0 { return i + 1 }
        i += 1
      }
      return n
    }
  }

  /// Chunk lengths of a whole buffer (tests and tools; the ingest path streams).
  public func chunkLengths(_ bytes: [UInt8]) -> [Int] {
    bytes.withUnsafeBytes { all in
      var out: [Int] = []
      var start = 0
      while start < all.count {
        let len = cut(UnsafeRawBufferPointer(rebasing: all[start...]))
        out.append(len)
        start += len
      }
      return out
    }
  }
}

@inline(__always) func log2Floor(_ x: UInt64) -> UInt64 { UInt64(63 - x.leadingZeroBitCount) }

/// 256 fixed pseudo-random words (splitmix64 from a fixed seed): part of the chunk format, since
/// changing them changes every boundary and so every chunk name.
let gearTable: [UInt64] = {
  var state: UInt64 = 0x6E69_7866_735F_6364  // "nixfs_cd"
  return (0..<256).map { _ in
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
}()
