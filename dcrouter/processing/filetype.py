"""What a part's content is, by its first bytes (magic numbers), whatever its declared type or name says.

Only the first :data:`SNIFF_BYTES` decoded bytes of a part are looked at, so sniffing costs the same for a 1
KB and a 50 MB attachment. The answer is a MIME type string, or ``None`` when nothing known matched (which is
not a verdict of harmlessness: plain text and unknown binaries both give ``None``).
"""

from __future__ import annotations

import re

#: How many leading decoded bytes of a part :func:`sniff_type` needs.
SNIFF_BYTES = 8192

EXECUTABLE_TYPES = frozenset(
    {
        "application/x-msdownload",
        "application/x-executable",
        "application/x-mach-binary",
        "application/x-shellscript",
        "application/java-vm",
        "application/x-ms-shortcut",
    }
)

_SIMPLE: tuple[tuple[bytes, str], ...] = (
    (b"\x7fELF", "application/x-executable"),
    (b"\xfe\xed\xfa\xce", "application/x-mach-binary"),
    (b"\xfe\xed\xfa\xcf", "application/x-mach-binary"),
    (b"\xce\xfa\xed\xfe", "application/x-mach-binary"),
    (b"\xcf\xfa\xed\xfe", "application/x-mach-binary"),
    (b"Rar!\x1a\x07", "application/vnd.rar"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"\x1f\x8b", "application/gzip"),
    (b"BZh", "application/x-bzip2"),
    (b"\xfd7zXZ\x00", "application/x-xz"),
    (b"\x28\xb5\x2f\xfd", "application/zstd"),
    (b"MSCF\x00\x00\x00\x00", "application/vnd.ms-cab-compressed"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
    (b"L\x00\x00\x00\x01\x14\x02\x00", "application/x-ms-shortcut"),
    (b"{\\rtf", "application/rtf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"BM", "image/bmp"),
    (b"%!PS", "application/postscript"),
)

# Markup a browser or mail client renders as HTML (or scriptable SVG), after leading white space or a BOM.
_HTML = re.compile(
    rb"<(?:!doctype\s+html|html|head|body|script|iframe|frameset|meta|title|style|a\s|div|table|p[\s>]|br|b>|img\s"
    rb"|!--)",
    re.IGNORECASE,
)
_SVG = re.compile(
    rb"(?:<\?xml[^>]{0,200}>\s*)?(?:<!--.{0,200}?-->\s*)?(?:<!doctype[^>]{0,300}>\s*)?<svg[\s>]",
    re.IGNORECASE | re.DOTALL,
)
_XML = re.compile(rb"<\?xml\s", re.IGNORECASE)


def sniff_type(head: bytes) -> str | None:
    """The content type that ``head`` (the first bytes of a decoded part, up to :data:`SNIFF_BYTES`) shows."""
    if head.startswith(b"MZ"):
        return "application/x-msdownload"
    if head.startswith(b"#!"):
        return "application/x-shellscript"
    if head.startswith(b"\xca\xfe\xba\xbe") and len(head) >= 8:
        # Both a Java class file and a Mach-O universal binary: a fat header counts a few architectures, a
        # class file has a major version of 45 or more there.
        fat = int.from_bytes(head[4:8], "big") < 45
        return "application/x-mach-binary" if fat else "application/java-vm"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_flavour(head)
    for magic, kind in _SIMPLE:
        if head.startswith(magic):
            return kind
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "application/x-tar"
    # Readers accept "%PDF-" anywhere in the first kilobyte; so must we, or junk in front hides a PDF.
    if b"%PDF-" in head[:1024]:
        return "application/pdf"
    return _markup(head)


def _zip_flavour(head: bytes) -> str:
    # The first entries' names are in the local file headers at the start; that is enough to tell the usual
    # zip-based formats apart without reading the central directory at the end.
    if head[30:38] == b"mimetype" and b"application/vnd.oasis.opendocument" in head[38:200]:
        return "application/vnd.oasis.opendocument"
    if b"META-INF/MANIFEST.MF" in head or head[30:39] == b"META-INF/":
        return "application/java-archive"
    if b"[Content_Types].xml" in head or b"_rels/.rels" in head:
        if b"word/" in head:
            return "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        if b"xl/" in head:
            return "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
        if b"ppt/" in head:
            return "application/vnd.openxmlformats-officedocument.presentationml.presentation"
        return "application/vnd.openxmlformats-officedocument"
    if b"AndroidManifest.xml" in head or b"classes.dex" in head:
        return "application/vnd.android.package-archive"
    return "application/zip"


def _markup(head: bytes) -> str | None:
    text = head[:1024]
    for bom in (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"):
        if text.startswith(bom):
            text = text[len(bom) :]
            break
    text = text.lstrip(b" \t\r\n\x0c")
    if _SVG.match(text):
        return "image/svg+xml"
    if _HTML.match(text):
        return "text/html"
    if _XML.match(text):
        return "application/xml"
    return None
