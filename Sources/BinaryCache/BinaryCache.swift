// The binary cache client: narinfo, NAR streams, decompression, verification, closures.
