"""Tests for dcrouter.processing.scanners.attachment: real messages, walked by the MIME inspector, judged on
declared names, names inside archives (and archives inside them), sniffed and declared types; hostile names
included."""

from __future__ import annotations

import io
import zipfile
from typing import Any

from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dcrouter.config.processing import ScannerConfig
from dcrouter.interfaces import IScanner
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.headers import read_header_block
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.message import Draft, ScanResult, Verdict
from dcrouter.processing.mime import MimeLimits, inspect_message
from dcrouter.processing.scanners.attachment import (
    AttachmentScanner,
    canonical_type,
    name_forms,
    normalise_extension,
)
from tests.archive_samples import make_gzip, make_tar, make_zip, nested_zips, rar5
from tests.mime_samples import CRLF, attachment, b64, entity, headers, message, multipart, text_part

EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + bytes(200)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(100)
PDF = b"%PDF-1.4\n" + bytes(100)
DEFAULT_LIMITS = MimeLimits()


def make_draft(data: bytes, limits: MimeLimits = DEFAULT_LIMITS, envelope: Envelope | None = None) -> Draft:
    """A Draft as the processor builds it: the header block, the walker's info, the bytes as received."""
    headers_block, offset = read_header_block(io.BytesIO(data), limits.max_header_bytes)
    return Draft(
        queue_id="TEST",
        envelope=envelope or Envelope("alice@example.org", ["bob@example.com"]),
        source=SpooledMessage(len(data), data=data),
        headers=headers_block,
        body_offset=offset,
        run_in_thread=lambda work: succeed(work()),
        info=inspect_message(io.BytesIO(data), limits),
    )


def mixed(*parts: bytes) -> bytes:
    return message(headers(("Content-Type", 'multipart/mixed; boundary="b"')), multipart(b"b", list(parts)))


def with_attachments(*parts: bytes) -> bytes:
    return mixed(text_part("Please see attached."), *parts)


def raw_attachment(fields: str, data: bytes) -> bytes:
    """An attachment with the given Content-Type/Content-Disposition lines (exactly as written), base64."""
    return entity(
        fields.encode("utf-8").replace(b"\n", CRLF) + CRLF + b"Content-Transfer-Encoding: base64\r\n",
        b64(data),
    )


def config(**given: Any) -> ScannerConfig:
    given.setdefault("blocked_extensions", [".exe", "SCR", "js", ".tar.gz"])
    return ScannerConfig(type="attachment", **given)


class AttachmentScannerTestCase(SynchronousTestCase):
    def scan(self, data: bytes, *, limits: MimeLimits = DEFAULT_LIMITS, **given: Any) -> ScanResult:
        result = AttachmentScanner(config(**given)).scan(make_draft(data, limits))
        self.assertIsInstance(result, ScanResult)  # synchronous, never a Deferred
        self.assertRegex(result.reason, r"\A[ -~]{0,100}\Z")
        return result

    def assertBlocked(self, data: bytes, reason: str, **given: Any) -> None:
        result = self.scan(data, **given)
        self.assertEqual((result.verdict, result.reason), (Verdict.BLOCKED, reason))
        self.assertEqual(result.headers, (("X-Attachment-Warning", reason),))

    def assertClean(self, data: bytes, **given: Any) -> None:
        result = self.scan(data, **given)
        self.assertEqual((result.verdict, result.reason, result.headers), (Verdict.CLEAN, "", ()))


class InterfaceTests(AttachmentScannerTestCase):
    def test_provides_iscanner(self) -> None:
        scanner = AttachmentScanner(config(name="policy"))
        self.assertTrue(verifyObject(IScanner, scanner))
        self.assertEqual(scanner.name, "policy")
        self.assertEqual(AttachmentScanner(config()).name, "attachment")

    def test_result_names_the_scanner(self) -> None:
        result = AttachmentScanner(config(name="policy")).scan(
            make_draft(with_attachments(attachment("a.exe", EXE)))
        )
        self.assertEqual(result.scanner, "policy")

    def test_clean_message(self) -> None:
        self.assertClean(
            with_attachments(attachment("invoice.pdf", PDF), attachment("photo.jpg", JPEG, "image/jpeg"))
        )
        self.assertClean(message(b"", b"just text" + CRLF))

    def test_not_inspected(self) -> None:
        draft = make_draft(with_attachments())
        draft.info = None
        self.assertEqual(AttachmentScanner(config()).scan(draft).verdict, Verdict.UNSCANNABLE)


class NameTests(AttachmentScannerTestCase):
    def test_extension_in_any_case_and_config_form(self) -> None:
        for name in ("setup.exe", "SETUP.EXE", "Setup.Exe", "screen.scr", "app.JS"):
            self.assertBlocked(with_attachments(attachment(name, b"data")), f"attachment {name}")

    def test_normalise_extension(self) -> None:
        self.assertEqual(
            [normalise_extension(e) for e in (".EXE", "exe", " .Exe ", "..exe", "", ".")],
            [".exe"] * 4 + ["", ""],
        )

    def test_double_and_compound_extensions(self) -> None:
        self.assertBlocked(
            with_attachments(attachment("invoice.pdf.exe", b"x")), "attachment invoice.pdf.exe"
        )
        self.assertBlocked(with_attachments(attachment("backup.TAR.GZ", b"x")), "attachment backup.TAR.GZ")
        self.assertClean(with_attachments(attachment("setup.exe.txt", b"plain words")))
        self.assertClean(with_attachments(attachment("exe", b"plain words"), attachment("notes.gz", b"x")))

    def test_trailing_dots_and_spaces(self) -> None:
        for name in ("setup.exe.", "setup.exe   ", "setup.exe . .", "setup.exe\t"):
            result = self.scan(with_attachments(attachment(name, b"x")))
            self.assertEqual(result.verdict, Verdict.BLOCKED, repr(name))

    def test_right_to_left_override_and_invisible_characters(self) -> None:
        # Shown as "invoiceexe.pdf" by a bidi-aware client; it is an .exe.
        self.assertBlocked(
            with_attachments(attachment("invoice\u202efdp.exe", b"x")), "attachment invoice?fdp.exe"
        )
        # Invisible characters inside the extension do not hide it.
        for name in (
            "setup.e\u202ex\u202ce",
            "setup.ex\u200be",
            "setup.\u2066exe\u2069",
            "setup\uff0e\uff45\uff58\uff45",
        ):
            self.assertEqual(
                self.scan(with_attachments(attachment(name, b"x"))).verdict, Verdict.BLOCKED, repr(name)
            )

    def test_name_forms(self) -> None:
        self.assertEqual(name_forms("A.EXE. "), {"a.exe"})
        self.assertEqual(name_forms("a.exe:Zone.Identifier"), {"a.exe:zone.identifier", "a.exe"})
        self.assertIn("evil.exe", name_forms("evil.exe\ufffd.pdf"))

    def test_cut_at_nul_or_stream(self) -> None:
        fields = (
            "Content-Type: application/octet-stream\n"
            'Content-Disposition: attachment; filename="evil.exe\x00.pdf"'
        )
        self.assertEqual(self.scan(with_attachments(raw_attachment(fields, b"x"))).verdict, Verdict.BLOCKED)
        self.assertEqual(
            self.scan(with_attachments(attachment("evil.exe::$DATA", b"x"))).verdict, Verdict.BLOCKED
        )

    def test_every_declared_name_is_checked(self) -> None:
        # Content-Disposition says pdf, Content-Type's name says exe: clients differ on which they show.
        fields = (
            'Content-Type: application/pdf; name="invoice.exe"\n'
            'Content-Disposition: attachment; filename="invoice.pdf"'
        )
        self.assertBlocked(with_attachments(raw_attachment(fields, PDF)), "attachment invoice.exe")

    def test_rfc2231_and_encoded_word_names(self) -> None:
        continued = (
            "Content-Type: application/octet-stream\n"
            "Content-Disposition: attachment;\n filename*0*=utf-8''%E2%80%AEfdp;\n filename*1*=.%65%78%65"
        )
        self.assertBlocked(with_attachments(raw_attachment(continued, b"x")), "attachment ?fdp.exe")
        encoded = 'Content-Type: application/octet-stream; name="=?utf-8?b?cmVwb3J0LmV4ZQ==?="'
        self.assertBlocked(with_attachments(raw_attachment(encoded, b"x")), "attachment report.exe")

    def test_long_and_hostile_names_make_a_safe_reason(self) -> None:
        # RFC 2231 percent-encoding carries anything, CR LF included, into a name.
        name = "r\u00e9sum\u00e9 " + "x" * 300 + "\r\n.exe"
        raw = "".join(f"%{b:02X}" for b in name.encode())
        part = raw_attachment(
            "Content-Type: application/octet-stream\n"
            f"Content-Disposition: attachment; filename*=utf-8''{raw}",
            b"x",
        )
        result = self.scan(with_attachments(part))
        self.assertEqual(result.verdict, Verdict.BLOCKED)
        self.assertTrue(result.reason.startswith("attachment r?sum? xxx"), result.reason)
        self.assertTrue(result.reason.endswith("xx??.exe"), result.reason)
        self.assertLessEqual(len(result.reason), 100)


class ArchiveTests(AttachmentScannerTestCase):
    def test_names_inside_zip(self) -> None:
        data = make_zip({"readme.txt": b"hi", "bin/Setup.EXE": EXE})
        self.assertBlocked(
            with_attachments(attachment("docs.zip", data, "application/zip")),
            "attachment docs.zip contains bin/Setup.EXE",
        )
        self.assertClean(
            with_attachments(attachment("docs.zip", data, "application/zip")), scan_archives=False
        )

    def test_zip_under_a_harmless_name(self) -> None:
        data = make_zip({"invoice.pdf\u202eexe.js": b"x"})
        self.assertBlocked(
            with_attachments(attachment("photo.jpg", data, "image/jpeg")),
            "attachment photo.jpg contains invoice.pdf?exe.js",
        )

    def test_zip_in_a_zip(self) -> None:
        inner = make_zip({"evil.exe": EXE})
        outer = make_zip({"inner.zip": inner, "notes.txt": b"x"})
        self.assertBlocked(
            with_attachments(attachment("docs.zip", outer)), "attachment docs.zip contains inner.zip/evil.exe"
        )
        # With .zip blocked the outer one hits on its own name first, so name it otherwise.
        self.assertBlocked(
            with_attachments(attachment("docs.dat", outer)),
            "attachment docs.dat contains inner.zip",
            blocked_extensions=[".zip"],
        )

    def test_tar_gz_and_gzip(self) -> None:
        self.assertBlocked(
            with_attachments(
                attachment("src.tar.gz", make_tar({"src/setup.exe": EXE}, "gz"), "application/gzip")
            ),
            "attachment src.tar.gz contains src/setup.exe",
            blocked_extensions=[".exe"],
        )
        self.assertBlocked(
            with_attachments(attachment("x.exe.gz", make_gzip(EXE), "application/gzip")),
            "attachment x.exe.gz contains x.exe",
        )
        self.assertClean(
            with_attachments(attachment("notes.txt.gz", make_gzip(b"hello"), "application/gzip"))
        )

    def test_stored_rar(self) -> None:
        self.assertBlocked(
            with_attachments(attachment("x.rar", rar5({"a/b.exe": EXE}), "application/vnd.rar")),
            "attachment x.rar contains a/b.exe",
        )
        result = self.scan(with_attachments(attachment("x.rar", rar5({"a.txt": b"x"}, method=3))))
        self.assertEqual(
            (result.verdict, result.reason),
            (Verdict.UNSCANNABLE, "attachment x.rar: compressed RAR content cannot be opened"),
        )

    def test_depth_bomb_is_unscannable(self) -> None:
        result = self.scan(with_attachments(attachment("deep.zip", nested_zips(10, {"a.txt": b"x"}))))
        self.assertEqual(
            (result.verdict, result.reason),
            (Verdict.UNSCANNABLE, "attachment deep.zip: archives nested deeper than 3 levels"),
        )

    def test_zip_bomb_is_unscannable(self) -> None:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("a.txt", "w") as entry:
            for _ in range(50):
                entry.write(bytes(1024 * 1024))
        result = self.scan(with_attachments(attachment("data.zip", out.getvalue())))
        self.assertEqual(result.verdict, Verdict.UNSCANNABLE)
        self.assertRegex(result.reason, r"\Aattachment data\.zip: zip bomb: ratio \d+:1 in a\.txt\Z")
        self.assertEqual(result.headers, (("X-Attachment-Warning", result.reason),))
        self.assertClean(with_attachments(attachment("data.zip", out.getvalue())), scan_archives=False)

    def test_encrypted_zip(self) -> None:
        data = bytearray(make_zip({"invoice.pdf": PDF}))
        data[data.find(b"PK\x01\x02") + 8] |= 0x01
        result = self.scan(with_attachments(attachment("secret.zip", bytes(data))))
        self.assertEqual(
            (result.verdict, result.reason), (Verdict.UNSCANNABLE, "attachment secret.zip: encrypted archive")
        )
        # A blocked name inside decides even when the rest cannot be read.
        data = bytearray(make_zip({"invoice.pdf": PDF, "run.exe": EXE}))
        data[data.find(b"PK\x01\x02") + 8] |= 0x01
        self.assertBlocked(
            with_attachments(attachment("secret.zip", bytes(data))), "attachment secret.zip contains run.exe"
        )

    def test_corrupt_and_oversized_zips(self) -> None:
        result = self.scan(with_attachments(attachment("a.zip", b"PK\x03\x04" + bytes(64))))
        self.assertEqual(result.verdict, Verdict.UNSCANNABLE)
        self.assertTrue(result.reason.startswith("attachment a.zip: corrupt archive: "), result.reason)
        big = make_zip({"a.txt": bytes(range(256)) * 40})
        result = self.scan(
            with_attachments(attachment("a.zip", big)), limits=MimeLimits(max_archive_bytes=100)
        )
        self.assertEqual(
            (result.verdict, result.reason), (Verdict.UNSCANNABLE, "attachment a.zip: archive too large")
        )


class TypeTests(AttachmentScannerTestCase):
    def test_executable_under_an_image_name(self) -> None:
        self.assertBlocked(
            with_attachments(attachment("photo.jpg", EXE, "image/jpeg")),
            "attachment photo.jpg is application/x-msdownload",
        )

    def test_unnamed_executable(self) -> None:
        part = entity(
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n", b64(EXE)
        )
        self.assertBlocked(with_attachments(part), "attachment (part 2) is application/x-msdownload")

    def test_content_matching_its_name_is_judged_by_the_name(self) -> None:
        # A .dll is a PE file; with .exe blocked and .dll not, the name says what it is and is allowed.
        self.assertClean(with_attachments(attachment("helper.dll", EXE)))
        self.assertBlocked(
            with_attachments(attachment("helper.dll", EXE)),
            "attachment helper.dll",
            blocked_extensions=[".dll"],
        )

    def test_sniffed_kind_not_blocked(self) -> None:
        self.assertClean(with_attachments(attachment("photo.jpg", PDF, "image/jpeg")))

    def test_blocked_types_declared_and_sniffed_with_aliases(self) -> None:
        given = {"blocked_extensions": [], "blocked_types": ["application/x-dosexec", "TEXT/HTML"]}
        self.assertBlocked(
            with_attachments(attachment("photo.jpg", EXE, "image/jpeg")),
            "attachment photo.jpg is application/x-msdownload",
            **given,
        )
        self.assertBlocked(
            with_attachments(attachment("a.bin", b"x", "application/x-msdownload")),
            "attachment a.bin is application/x-msdownload",
            **given,
        )
        self.assertBlocked(
            with_attachments(attachment("a.txt", b"<html><body>x</body></html>", "text/plain")),
            "attachment a.txt is text/html",
            **given,
        )
        self.assertClean(with_attachments(attachment("a.pdf", PDF, "application/pdf")), **given)
        # An HTML body is not an attachment.
        self.assertClean(mixed(text_part("<p>hello</p>", "text/html")), **given)

    def test_wildcard_type(self) -> None:
        given = {"blocked_extensions": [], "blocked_types": ["audio/*"]}
        self.assertBlocked(
            with_attachments(attachment("a.mp3", b"ID3", "audio/mpeg")),
            "attachment a.mp3 is audio/mpeg",
            **given,
        )

    def test_html_disguised_as_pdf(self) -> None:
        html = b"<!DOCTYPE html><html><body><form action=x>password</form></body></html>"
        self.assertBlocked(
            with_attachments(attachment("invoice.pdf", html, "application/pdf")),
            "attachment invoice.pdf is text/html",
            blocked_extensions=[".htm", ".html"],
        )
        self.assertClean(
            with_attachments(attachment("page.html", html, "text/html")), blocked_extensions=[".htm"]
        )

    def test_canonical_type(self) -> None:
        self.assertEqual(canonical_type(" Application/X-DOSEXEC "), "application/x-msdownload")
        self.assertEqual(canonical_type("image/png"), "image/png")


class UnscannableTests(AttachmentScannerTestCase):
    def test_unscannable_message(self) -> None:
        body = b"--b" + CRLF + text_part("first") + CRLF + b"--b" + CRLF + attachment("a.txt", b"x")
        result = self.scan(message(headers(("Content-Type", "multipart/mixed; boundary=b")), body))
        self.assertEqual(result.verdict, Verdict.UNSCANNABLE)
        self.assertTrue(result.reason.startswith("unscannable: multipart not closed"), result.reason)

    def test_blocked_attachment_seen_before_the_limit_wins(self) -> None:
        data = with_attachments(attachment("a.exe", b"x"), attachment("big.bin", bytes(5000)))
        result = self.scan(data, limits=MimeLimits(max_decoded_bytes=2000))
        self.assertEqual((result.verdict, result.reason), (Verdict.BLOCKED, "attachment a.exe"))

    def test_limit_makes_it_unscannable(self) -> None:
        result = self.scan(
            with_attachments(attachment("big.bin", bytes(5000))), limits=MimeLimits(max_decoded_bytes=2000)
        )
        self.assertEqual(result.verdict, Verdict.UNSCANNABLE)
        self.assertIn("decoded content larger than 2000 bytes", result.reason)
