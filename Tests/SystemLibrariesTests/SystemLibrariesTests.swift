import CCurl
import CFuse3
import CLzma
import CSQLite
import CZstd
import Testing

/// The C libraries link and are the versions the code is written for.
@Suite struct SystemLibrariesTests {
  @Test func versions() {
    #expect(nixfs_fuse_version() >= 312)
    #expect(ZSTD_versionNumber() >= 10_500)
    #expect(lzma_version_number() >= 50_020_000)
    #expect(sqlite3_libversion_number() >= 3_035_000)
    let info = nixfs_curl_version_info()
    #expect(info != nil && info!.pointee.version_num >= 0x074400)
  }

  @Test func zstdRoundTrip() {
    let input = [UInt8](repeating: 7, count: 10_000)
    var compressed = [UInt8](repeating: 0, count: ZSTD_compressBound(input.count))
    let n = ZSTD_compress(&compressed, compressed.count, input, input.count, 3)
    #expect(ZSTD_isError(n) == 0)
    var output = [UInt8](repeating: 0, count: input.count)
    let m = ZSTD_decompress(&output, output.count, compressed, n)
    #expect(m == input.count && output == input)
  }
}
