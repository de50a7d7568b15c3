"""Memory and pages: RAM blocks and their backings, which pages are populated, page-level codecs (zero test,
hashes, xbzrle).

Below the extension points: a dirty tracker, a stream and a compressor all speak in RAM blocks and pages.
"""
