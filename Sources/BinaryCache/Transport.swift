import CCurl
import Foundation
import NixFormats
import Synchronization
import Threads

/// What a response said before its body.
struct ResponseHead: Sendable {
  /// The HTTP status; `file://` transfers report 200 (or 404 for a missing file).
  var status: Int
  /// The `Content-Range` header of a 206, if any.
  var contentRange: String?
  /// Every header, names in lower case.
  var headers: [String: String] = [:]
  /// The first 4 KiB of a non-2xx response's body (S3 says there why it refused).
  var errorBody: [UInt8] = []
  var isSuccess: Bool { (200..<300).contains(status) }
}

struct TransportSettings: Sendable {
  var userAgent: String
  var connectTimeout: Double
  var stallTimeout: Double
  var lowSpeedLimit: Double
  var netrcFile: String?
  var caFile: String?
  var maxConnections: Int
  /// `s3://` buckets: requests below each are signed (AWS SigV4).
  var signers: [S3Signer] = []
}

/// What one transfer attempt came to, for the per-substituter counters: the URL, the response
/// or the failure, and the body bytes received (error bodies included).
typealias TransferObserver = @Sendable (_ url: String, _ outcome: Result<ResponseHead, CacheError>, _ bytes: Int64) -> Void

/// libcurl on threads of our own, so no Swift concurrency thread ever waits on the network.
///
/// Each worker thread owns one easy handle for its whole life and only resets its options between
/// transfers: `curl_easy_reset` keeps live connections, the DNS cache and TLS sessions, so
/// consecutive requests to a cache reuse kept-alive connections. Body callbacks run on the worker,
/// which gives natural back-pressure (a slow consumer slows the socket reads) and lets parallel NAR
/// downloads decompress on several cores. Workers start on demand up to `maxConnections` and exit
/// after a short idle period, so an unused client holds no threads.
final class Transport: Sendable {
  let settings: TransportSettings
  let observer: TransferObserver?
  private let workers: WorkerPool<Handle>

  /// `curl_global_init` must run once before any thread uses libcurl.
  private static let globalInit: Void = { _ = curl_global_init(Int(CURL_GLOBAL_ALL)) }()

  init(settings: TransportSettings, observer: TransferObserver? = nil) {
    _ = Self.globalInit
    self.settings = settings
    self.observer = observer
    workers = WorkerPool(
      name: "nixfs-curl", maxThreads: settings.maxConnections, idleSeconds: 20,
      makeResource: {
        guard let easy = curl_easy_init() else { return nil }
        return Handle(easy: easy, errorBuffer: .allocate(capacity: Int(CURL_ERROR_SIZE) + 1))
      },
      releaseResource: { handle in
        curl_easy_cleanup(handle.easy)
        handle.errorBuffer.deallocate()
      })
  }

  /// Performs one GET. `onStart` runs once before the first body byte of a 2xx response;
  /// `onData` gets the body in order. Both run on a transport thread, never concurrently.
  /// `onEnd` runs there too, after the last byte of a complete 2xx response.
  /// Non-2xx statuses are returned, not thrown (but an S3 credential refusal); transport
  /// failures throw.
  /// With `post`, the request is a POST of those bytes instead.
  func get(
    _ url: String, from offset: UInt64 = 0, post: [UInt8]? = nil,
    onStart: @escaping @Sendable (ResponseHead) throws -> Void,
    onData: @escaping @Sendable (UnsafeRawBufferPointer) throws -> Void,
    onEnd: (@Sendable () throws -> Void)? = nil
  ) async throws(CacheError) -> ResponseHead {
    let context = TransferContext(url: url, settings: settings, onStart: onStart, onData: onData, onEnd: onEnd)
    context.postBody = post
    var result: Result<ResponseHead, CacheError> = await withTaskCancellationHandler {
      await withCheckedContinuation { continuation in
        workers.submit { handle in
          continuation.resume(returning: context.perform(easy: handle.easy, errorBuffer: handle.errorBuffer, offset: offset))
        }
      }
    } onCancel: {
      context.cancel()
    }
    // A 403 is a miss to Nix, unless S3 says it is about who asks: then it is an error, for
    // every kind of request.
    if case .success(let head) = result, head.status == 403, let refusal = S3Refusal(head.errorBody),
      refusal.isAboutCredentials
    {
      result = .failure(.s3Refused(url: url, code: refusal.code, message: refusal.message))
    }
    observer?(url, result, context.bodyBytes)
    return try result.get()
  }

  /// One easy handle per worker thread, with its error buffer.
  struct Handle: @unchecked Sendable {
    let easy: UnsafeMutableRawPointer
    let errorBuffer: UnsafeMutablePointer<CChar>
  }
}

/// The state of one transfer, shared with libcurl's C callbacks through an unmanaged pointer.
private final class TransferContext: @unchecked Sendable {
  let url: String
  let settings: TransportSettings
  let onStart: @Sendable (ResponseHead) throws -> Void
  let onData: @Sendable (UnsafeRawBufferPointer) throws -> Void
  let onEnd: (@Sendable () throws -> Void)?
  /// Set from the cancelling task, read by the transfer's thread.
  private let cancelled = Atomic<Bool>(false)
  var easy: UnsafeMutableRawPointer? = nil
  var head: ResponseHead? = nil
  var headers: [String: String] = [:]
  var callbackError: (any Error)? = nil
  var postBody: [UInt8]? = nil
  var isFile: Bool
  /// Body bytes received in the last attempt, error bodies included.
  var bodyBytes: Int64 = 0
  var errorBody: [UInt8] = []
  /// The stall clock: when the transfer last made `stallBytes` of progress, and how far it was.
  var progressAt = DispatchTime.now()
  var progressBytes: Int64 = 0
  var stalled = false
  var stallBytes: Int64 { Int64(max(1, settings.lowSpeedLimit * settings.stallTimeout)) }

  init(
    url: String, settings: TransportSettings, onStart: @escaping @Sendable (ResponseHead) throws -> Void,
    onData: @escaping @Sendable (UnsafeRawBufferPointer) throws -> Void, onEnd: (@Sendable () throws -> Void)?
  ) {
    self.onEnd = onEnd
    self.url = url
    self.settings = settings
    self.onStart = onStart
    self.onData = onData
    self.isFile = url.hasPrefix("file:")
  }

  func cancel() {
    cancelled.store(true, ordering: .releasing)
  }

  var isCancelled: Bool {
    cancelled.load(ordering: .acquiring)
  }

  /// Called by libcurl at least once a second: true aborts the transfer. A transfer stalls when
  /// it made less than `stallBytes` of progress in the last `stallTimeout` seconds (our own clock:
  /// libcurl's LOW_SPEED check averages over a window and fired seconds late).
  func checkProgress(received: Int64) -> Bool {
    if isCancelled { return true }
    let now = DispatchTime.now()
    if received - progressBytes >= stallBytes {
      progressBytes = received
      progressAt = now
      return false
    }
    if Double(now.uptimeNanoseconds - progressAt.uptimeNanoseconds) / 1e9 >= settings.stallTimeout {
      stalled = true
      return true
    }
    return false
  }

  func currentStatus() -> Int {
    guard let easy else { return 0 }
    var code = 0
    _ = nixfs_curl_easy_getinfo_long(easy, CURLINFO_RESPONSE_CODE, &code)
    return isFile ? 200 : code
  }

  /// Body bytes from libcurl. Returns false to abort the transfer.
  func receive(_ bytes: UnsafeRawBufferPointer) -> Bool {
    bodyBytes += Int64(bytes.count)
    if head == nil {
      let h = ResponseHead(status: currentStatus(), contentRange: headers["content-range"], headers: headers)
      head = h
      if h.isSuccess {
        do { try onStart(h) } catch {
          callbackError = error
          return false
        }
      }
    }
    // The body of an error response is not the file: keep only its start, for the error.
    guard head!.isSuccess else {
      errorBody.append(contentsOf: bytes.prefix(max(0, 4096 - errorBody.count)))
      return true
    }
    do { try onData(bytes) } catch {
      callbackError = error
      return false
    }
    return true
  }

  func header(_ line: UnsafeRawBufferPointer) {
    let text = String(decoding: line, as: UTF8.self)
    if text.hasPrefix("HTTP/") {
      headers = [:]  // a new response (after a redirect or a 100 Continue)
      return
    }
    guard let colon = text.firstIndex(of: ":") else { return }
    headers[text[..<colon].lowercased()] = text[text.index(after: colon)...].trimmingCharacters(in: .whitespacesAndNewlines)
  }

  func perform(easy: UnsafeMutableRawPointer, errorBuffer: UnsafeMutablePointer<CChar>, offset: UInt64) -> Result<ResponseHead, CacheError> {
    if isCancelled { return .failure(.cancelled(url: url)) }
    progressAt = DispatchTime.now()
    progressBytes = 0
    bodyBytes = 0
    errorBody = []
    stalled = false
    self.easy = easy
    defer { self.easy = nil }
    curl_easy_reset(easy)
    errorBuffer[0] = 0
    let me = Unmanaged.passRetained(self)
    defer { me.release() }
    let opaque = UnsafeRawPointer(me.toOpaque())
    _ = nixfs_curl_easy_setopt_str(easy, CURLOPT_URL, url)
    _ = nixfs_curl_easy_setopt_long(easy, CURLOPT_NOSIGNAL, 1)
    _ = nixfs_curl_easy_setopt_long(easy, CURLOPT_FOLLOWLOCATION, 1)
    _ = nixfs_curl_easy_setopt_long(easy, CURLOPT_MAXREDIRS, 10)
    _ = nixfs_curl_easy_setopt_str(easy, CURLOPT_USERAGENT, settings.userAgent)
    _ = nixfs_curl_easy_setopt_long(easy, CURLOPT_CONNECTTIMEOUT_MS, max(1, Int(settings.connectTimeout * 1000)))
    // Only the protocols of the substituter: a narinfo URL or a redirect cannot make the daemon
    // read local files or speak gopher/dict/... to an arbitrary port (URLPolicy checks the rest).
    _ = nixfs_curl_easy_setopt_str(easy, CURLOPT_PROTOCOLS_STR, isFile ? "file" : "http,https")
    _ = nixfs_curl_easy_setopt_str(easy, CURLOPT_REDIR_PROTOCOLS_STR, "http,https")
    _ = nixfs_curl_easy_setopt_long(easy, CURLOPT_TCP_KEEPALIVE, 1)
    _ = nixfs_curl_easy_setopt_long(easy, CURLOPT_BUFFERSIZE, 256 << 10)
    if let netrc = settings.netrcFile {
      _ = nixfs_curl_easy_setopt_long(easy, CURLOPT_NETRC, Int(CURL_NETRC_OPTIONAL.rawValue))
      _ = nixfs_curl_easy_setopt_str(easy, CURLOPT_NETRC_FILE, netrc)
    }
    if let ca = settings.caFile { _ = nixfs_curl_easy_setopt_str(easy, CURLOPT_CAINFO, ca) }
    // Proxies: libcurl reads http_proxy / https_proxy / all_proxy / no_proxy from the environment.
    if offset > 0 { _ = nixfs_curl_easy_setopt_str(easy, CURLOPT_RANGE, "\(offset)-") }
    if let body = postBody {
      // libcurl copies the bytes: nothing here must outlive the call.
      _ = nixfs_curl_easy_setopt_off(easy, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(body.count))
      _ = body.withUnsafeBytes { nixfs_curl_easy_setopt_ptr(easy, CURLOPT_COPYPOSTFIELDS, $0.baseAddress) }
    }
    // An s3:// bucket: libcurl signs the request (SigV4) with the key as user and password. S3
    // wants the payload's hash too, in a header the signature covers: a GET has none.
    var headerList: UnsafeMutablePointer<curl_slist>? = nil
    defer { curl_slist_free_all(headerList) }
    if let signer = settings.signers.first(where: { $0.signs(url) }) {
      _ = nixfs_curl_easy_setopt_str(easy, CURLOPT_AWS_SIGV4, "aws:amz:\(signer.region):s3")
      _ = nixfs_curl_easy_setopt_str(easy, CURLOPT_USERNAME, signer.credentials.accessKeyID)
      _ = nixfs_curl_easy_setopt_str(easy, CURLOPT_PASSWORD, signer.credentials.secretAccessKey)
      let payload = NixHash.sha256(postBody ?? []).hex
      headerList = curl_slist_append(headerList, "x-amz-content-sha256: \(payload)")
      if let token = signer.credentials.sessionToken {
        headerList = curl_slist_append(headerList, "x-amz-security-token: \(token)")
      }
      _ = nixfs_curl_easy_setopt_ptr(easy, CURLOPT_HTTPHEADER, headerList)
    }
    _ = nixfs_curl_easy_setopt_ptr(easy, CURLOPT_ERRORBUFFER, errorBuffer)
    _ = nixfs_curl_easy_setopt_write(easy, CURLOPT_WRITEFUNCTION, writeCallback)
    _ = nixfs_curl_easy_setopt_ptr(easy, CURLOPT_WRITEDATA, opaque)
    _ = nixfs_curl_easy_setopt_write(easy, CURLOPT_HEADERFUNCTION, headerCallback)
    _ = nixfs_curl_easy_setopt_ptr(easy, CURLOPT_HEADERDATA, opaque)
    _ = nixfs_curl_easy_setopt_long(easy, CURLOPT_NOPROGRESS, 0)
    _ = nixfs_curl_easy_setopt_xferinfo(easy, CURLOPT_XFERINFOFUNCTION, progressCallback)
    _ = nixfs_curl_easy_setopt_ptr(easy, CURLOPT_XFERINFODATA, opaque)

    let code = curl_easy_perform(easy)
    // Leave no pointer to this context (or to the header list freed next) in the reused handle.
    _ = nixfs_curl_easy_setopt_ptr(easy, CURLOPT_ERRORBUFFER, nil)
    _ = nixfs_curl_easy_setopt_ptr(easy, CURLOPT_HTTPHEADER, nil)

    if let error = callbackError {
      if let e = error as? CacheError { return .failure(e) }
      return .failure(.sink(url: url, error: error))
    }
    if isCancelled { return .failure(.cancelled(url: url)) }
    if stalled { return .failure(.stalled(url: url, seconds: settings.stallTimeout, attempts: 1)) }
    switch code {
    case CURLE_OK:
      if head == nil {
        // An empty body: the callbacks never ran.
        let h = ResponseHead(status: currentStatus(), contentRange: headers["content-range"], headers: headers)
        head = h
        if h.isSuccess {
          do { try onStart(h) } catch {
            return .failure((error as? CacheError) ?? .sink(url: url, error: error))
          }
        }
      }
      if head!.isSuccess, let onEnd {
        do { try onEnd() } catch {
          return .failure((error as? CacheError) ?? .sink(url: url, error: error))
        }
      }
      var final = head!
      final.errorBody = errorBody
      return .success(final)
    case CURLE_FILE_COULDNT_READ_FILE where isFile:
      return .success(ResponseHead(status: 404))
    default:
      var message = String(cString: errorBuffer)
      if message.isEmpty { message = String(cString: curl_easy_strerror(code)) }
      return .failure(.network(url: url, curlCode: Int(code.rawValue), message: message, attempts: 1))
    }
  }
}

private let writeCallback: @convention(c) (UnsafeMutablePointer<CChar>?, Int, Int, UnsafeMutableRawPointer?) -> Int = {
  data, size, count, user in
  let context = Unmanaged<TransferContext>.fromOpaque(user!).takeUnretainedValue()
  let n = size * count
  return context.receive(UnsafeRawBufferPointer(start: data, count: n)) ? n : 0
}

private let headerCallback: @convention(c) (UnsafeMutablePointer<CChar>?, Int, Int, UnsafeMutableRawPointer?) -> Int = {
  data, size, count, user in
  let context = Unmanaged<TransferContext>.fromOpaque(user!).takeUnretainedValue()
  let n = size * count
  context.header(UnsafeRawBufferPointer(start: data, count: n))
  return n
}

private let progressCallback: @convention(c) (UnsafeMutableRawPointer?, curl_off_t, curl_off_t, curl_off_t, curl_off_t) -> Int32 = {
  user, _, downloaded, _, _ in
  let context = Unmanaged<TransferContext>.fromOpaque(user!).takeUnretainedValue()
  return context.checkProgress(received: Int64(downloaded)) ? 1 : 0
}
