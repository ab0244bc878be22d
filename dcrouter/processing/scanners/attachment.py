"""The attachment policy: refused file name extensions and content types, from the MIME walker's metadata.

Every attachment of :attr:`Draft.info` is checked on everything that could name or type it: each name the part
declares (a Content-Disposition filename and a Content-Type name may differ, and clients pick either), the
entry names of an archive attachment and of the archives inside it (``inner.zip/setup.exe``, down to
``mimeLimits.maxArchiveDepth`` levels; see :mod:`dcrouter.processing.archive`), the declared type and the type
sniffed from the content. Names are compared after the tricks that make a name look other than it is
are undone: case, Unicode compatibility forms, invisible format characters (the right-to-left override
``U+202E`` that shows ``invoice\\u202efdp.exe`` as ``invoiceexe.pdf``, zero-width spaces), trailing dots and
spaces Windows drops, and what follows a NUL or a ``:`` (an NTFS stream). A name hits when it *ends* with a
blocked extension, so ``invoice.pdf.exe`` hits on ``.exe`` and a configured ``.tar.gz`` works too.

Content that is a blocked kind under another name (``photo.jpg`` that is a Windows executable) hits when the
sniffed type is blocked, or when one of its usual extensions is blocked and a name does not say that kind.
The ``removeAttachment`` transformation matches parts by the same rules (:func:`has_extension`,
:func:`type_matches`, :func:`disguised`).

The scanner is pure CPU over metadata already extracted, so it answers synchronously.
"""

from __future__ import annotations

import re
import unicodedata

from zope.interface import implementer

from dcrouter.config.processing import ScannerConfig
from dcrouter.interfaces import IScanner
from dcrouter.processing.archive import printable
from dcrouter.processing.message import Draft, ScanResult, Verdict
from dcrouter.processing.mime import Part

#: Longest reason: it goes into an SMTP reply and a header.
MAX_REASON = 100
WARNING_HEADER = "X-Attachment-Warning"

#: Other names of the types :func:`dcrouter.processing.filetype.sniff_type` reports (libmagic's, browsers').
_TYPE_ALIASES = {
    "application/x-dosexec": "application/x-msdownload",
    "application/x-msdos-program": "application/x-msdownload",
    "application/x-ms-dos-executable": "application/x-msdownload",
    "application/vnd.microsoft.portable-executable": "application/x-msdownload",
    "application/x-exe": "application/x-msdownload",
    "application/exe": "application/x-msdownload",
    "application/x-winexe": "application/x-msdownload",
    "application/x-elf": "application/x-executable",
    "application/x-sharedlib": "application/x-executable",
    "application/x-pie-executable": "application/x-executable",
    "application/x-mach-o-executable": "application/x-mach-binary",
    "application/x-sh": "application/x-shellscript",
    "text/x-shellscript": "application/x-shellscript",
    "text/x-sh": "application/x-shellscript",
    "application/x-java-archive": "application/java-archive",
    "application/jar": "application/java-archive",
    "application/x-java-vm": "application/java-vm",
    "application/x-java-class": "application/java-vm",
    "application/x-zip-compressed": "application/zip",
    "application/x-zip": "application/zip",
    "application/x-rar-compressed": "application/vnd.rar",
    "application/x-rar": "application/vnd.rar",
    "application/x-gzip": "application/gzip",
}

#: The extensions files of a sniffed type usually have.
USUAL_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "application/x-msdownload": (".exe", ".dll", ".scr", ".com", ".cpl", ".pif", ".sys", ".ocx", ".efi"),
    "application/x-executable": (".elf", ".so", ".bin", ".run"),
    "application/x-mach-binary": (".dylib", ".bundle", ".o"),
    "application/x-shellscript": (".sh", ".bash", ".zsh", ".ksh", ".csh", ".command", ".py", ".pl", ".rb"),
    "application/java-vm": (".class",),
    "application/java-archive": (".jar", ".war", ".ear"),
    "application/x-ms-shortcut": (".lnk",),
    "application/vnd.android.package-archive": (".apk",),
    "application/zip": (".zip",),
    "application/vnd.rar": (".rar",),
    "application/x-7z-compressed": (".7z",),
    "application/gzip": (".gz", ".tgz"),
    "application/x-bzip2": (".bz2", ".tbz2"),
    "application/x-xz": (".xz", ".txz"),
    "application/zstd": (".zst",),
    "application/x-tar": (".tar",),
    "application/vnd.ms-cab-compressed": (".cab",),
    "application/x-ole-storage": (".doc", ".dot", ".xls", ".xlt", ".ppt", ".pps", ".msi", ".msg", ".pub"),
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": (".docx", ".docm", ".dotx"),
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": (".xlsx", ".xlsm", ".xltx"),
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": (".pptx", ".pptm", ".ppsx"),
    "application/vnd.oasis.opendocument": (".odt", ".ods", ".odp", ".odg", ".ott"),
    "application/rtf": (".rtf",),
    "application/pdf": (".pdf",),
    "application/postscript": (".ps", ".eps", ".ai"),
    "text/html": (".html", ".htm", ".shtml", ".xhtml", ".mht", ".mhtml"),
    "image/svg+xml": (".svg", ".svgz"),
    "image/png": (".png",),
    "image/jpeg": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "image/gif": (".gif",),
    "image/tiff": (".tif", ".tiff"),
    "image/bmp": (".bmp", ".dib"),
    "image/webp": (".webp",),
}

_TRAILING = re.compile(r"[\s.]+\Z")
_CUT_AT = (
    "\x00",
    "\ufffd",
    ":",
)  # a NUL some readers stop at (the walker shows it as U+FFFD), an NTFS stream


def name_forms(name: str) -> set[str]:
    """The ways ``name`` may be read once saved: NFKC, case-folded, without control or invisible format
    characters (bidi overrides, zero-width), without trailing dots and white space, and cut at a NUL or a
    colon."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    forms = {folded}
    for cut in _CUT_AT:
        if cut in folded:
            forms.add(folded.split(cut, 1)[0])
    cleaned = set()
    for form in forms:
        visible = "".join(ch for ch in form if unicodedata.category(ch) not in ("Cc", "Cf"))
        cleaned.add(_TRAILING.sub("", visible))
    return cleaned


def normalise_extension(extension: str) -> str:
    """``EXE``, ``.exe``, `` .Exe `` → ``.exe`` (empty for an empty entry)."""
    bare = unicodedata.normalize("NFKC", extension).strip().casefold().lstrip(".")
    return "." + bare if bare else ""


def canonical_type(kind: str) -> str:
    kind = kind.strip().lower()
    return _TYPE_ALIASES.get(kind, kind)


def has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    """Does any form of ``name`` (:func:`name_forms`) end with one of ``extensions`` (normalised)?"""
    return bool(extensions) and any(form.endswith(extensions) for form in name_forms(name))


def type_matches(kind: str, types: frozenset[str]) -> bool:
    """Is ``kind`` among ``types`` (canonical), directly or by ``main/*`` or ``*/*``?"""
    kind = canonical_type(kind)
    if kind in types:
        return True
    main = kind.split("/", 1)[0]
    return f"{main}/*" in types or "*/*" in types


def disguised(names: tuple[str, ...], sniffed_type: str, extensions: tuple[str, ...]) -> bool:
    """Is content of ``sniffed_type`` a kind whose usual extension is among ``extensions`` (normalised),
    under no name or a name of another kind?"""
    usual = USUAL_EXTENSIONS.get(canonical_type(sniffed_type), ())
    if not any(ext in extensions for ext in usual):
        return False
    return not names or not all(has_extension(name, usual) for name in names)


@implementer(IScanner)
class AttachmentScanner:
    """Refuses (``blocked``) messages with an attachment the configuration blocks; ``unscannable`` when the
    walker could not see the whole message, or (with ``scanArchives``) an archive attachment cannot be listed
    to the end: a bomb, too deep, encrypted, damaged, or of a kind that cannot be read. A blocked name found
    in it decides first."""

    def __init__(self, config: ScannerConfig) -> None:
        self.config = config
        self.name = config.label
        self._extensions = tuple(
            sorted({e for e in map(normalise_extension, config.blocked_extensions) if e})
        )
        self._types = frozenset(canonical_type(t) for t in config.blocked_types if t.strip())

    def scan(self, message: Draft) -> ScanResult:
        info = message.info
        if info is None:
            return self._result(Verdict.UNSCANNABLE, "message not inspected")
        for part in info.attachments:
            hit = self._check(part)
            if hit is not None:
                return self._result(Verdict.BLOCKED, hit)
        if info.unscannable is not None:
            return self._result(Verdict.UNSCANNABLE, f"unscannable: {info.unscannable}")
        if self.config.scan_archives:
            for part in info.attachments:
                if part.archive_problem is not None:
                    return self._result(Verdict.UNSCANNABLE, f"{_label(part)}: {part.archive_problem}")
        return ScanResult(scanner=self.name, verdict=Verdict.CLEAN)

    def _check(self, part: Part) -> str | None:
        """Why ``part`` is refused, or None."""
        for name in part.names:
            if self._blocked_name(name):
                return _label(part, name)
        if self.config.scan_archives:
            for entry in part.archive_names:
                if self._blocked_name(entry):
                    return f"{_label(part)} contains {printable(entry, 40)}"
        for kind in (part.declared_type, part.sniffed_type):
            if kind is not None and self._blocked_type(kind):
                return f"{_label(part)} is {printable(kind, 50)}"
        if part.sniffed_type is not None and disguised(part.names, part.sniffed_type, self._extensions):
            return f"{_label(part)} is {printable(part.sniffed_type, 50)}"
        return None

    def _blocked_name(self, name: str) -> bool:
        return has_extension(name, self._extensions)

    def _blocked_type(self, kind: str) -> bool:
        return type_matches(kind, self._types)

    def _result(self, verdict: Verdict, reason: str) -> ScanResult:
        reason = printable(reason, MAX_REASON)
        return ScanResult(
            scanner=self.name, verdict=verdict, reason=reason, headers=((WARNING_HEADER, reason),)
        )


def _label(part: Part, name: str | None = None) -> str:
    """``attachment <name>`` for a reply: the given name, the part's first, or its part number."""
    name = name if name is not None else (part.names[0] if part.names else None)
    return f"attachment {printable(name, 60)}" if name is not None else f"attachment (part {part.path})"
