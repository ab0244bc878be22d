"""Tests for dcrouter.mail.address: RFC 5321 paths, parameters, and relay tricks."""

from __future__ import annotations

import dataclasses
import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.mail.address import Address, AddressError, parse_mail_argument, parse_rcpt_argument
from dcrouter.mail.reply import Reply

_atext = st.sampled_from("abcxyzABCXYZ0189!#$%&'*+-/=?^_`{|}~")
_atom = st.text(_atext, min_size=1, max_size=8)
_dot_string = st.lists(_atom, min_size=1, max_size=4).map(".".join)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)
_qcontent = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


def mail(arg: str, utf8: bool = False) -> tuple[Address, dict[str, str]]:
    return parse_mail_argument(arg, utf8=utf8)


def rcpt(arg: str, utf8: bool = False) -> tuple[Address, dict[str, str]]:
    return parse_rcpt_argument(arg, utf8=utf8)


class AddressTests(SynchronousTestCase):
    def test_str(self) -> None:
        self.assertEqual(str(Address("u", "example.com")), "u@example.com")
        self.assertEqual(str(Address.null()), "")
        self.assertEqual(str(Address("postmaster", "")), "postmaster")

    def test_null(self) -> None:
        self.assertTrue(Address.null().is_null)
        self.assertFalse(Address("postmaster", "").is_null)

    def test_domain_lower_cased_local_kept(self) -> None:
        address = Address("User", "Example.COM")
        self.assertEqual(address, Address("User", "example.com"))
        self.assertNotEqual(address, Address("user", "example.com"))

    def test_literal_keeps_tag(self) -> None:
        address = Address("u", "[IPv6:2001:db8::1]")
        self.assertEqual(address.domain, "[IPv6:2001:db8::1]")
        self.assertTrue(address.is_literal)

    def test_frozen(self) -> None:
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, Address("u", "x.test"), "local", "v")


class MailArgumentTests(SynchronousTestCase):
    def test_plain(self) -> None:
        self.assertEqual(
            mail("FROM:<a@b.com> SIZE=100 BODY=8BITMIME"),
            (Address("a", "b.com"), {"SIZE": "100", "BODY": "8BITMIME"}),
        )

    def test_keyword_case_and_one_space(self) -> None:
        self.assertEqual(mail("from: <A@B.COM>")[0], Address("A", "b.com"))
        self.assertEqual(mail("FrOm:<a@b.com>")[0], Address("a", "b.com"))

    def test_two_spaces_after_keyword(self) -> None:
        self.assertSyntax(mail, "FROM:  <a@b.com>", 501, "5.1.7")

    def test_null_sender(self) -> None:
        self.assertEqual(mail("FROM:<>"), (Address.null(), {}))
        self.assertEqual(mail("FROM:<> BODY=7BIT"), (Address.null(), {"BODY": "7BIT"}))

    def test_missing_keyword(self) -> None:
        for arg in ["", "<a@b.com>", "FROM<a@b.com>", "TO:<a@b.com>", "FROM a@b.com"]:
            with self.subTest(arg=arg):
                self.assertSyntax(mail, arg, 501, "5.5.4")

    def test_bad_sender_syntax(self) -> None:
        for arg in [
            "FROM:",
            "FROM: ",
            "FROM:a@b.com",
            "FROM:<a@b.com",
            "FROM:<a@b.com>x",
            "FROM:<a@b.com>>",
            "FROM:<<a@b.com>>",
            "FROM:<a>",
            "FROM:<postmaster>",
            "FROM:<a@>",
            "FROM:<@b.com>",
            "FROM:<.a@b.com>",
            "FROM:<a.@b.com>",
            "FROM:<a..b@b.com>",
            "FROM:<a b@b.com>",
            "FROM:<a(b)@b.com>",
            "FROM:<a,b@b.com>",
            "FROM:<a@b_c.com>",
            "FROM:<a@-b.com>",
            "FROM:<a@b..com>",
            "FROM:<a@b.com.>",
            'FROM:<"a@b.com>',
            'FROM:<"a"b@b.com>',
            'FROM:<a"b"@b.com>',
            "FROM:<a@b.com@c.com>",
            "FROM:<a\x00@b.com>",
            "FROM:<a@b.com\t>",
        ]:
            with self.subTest(arg=arg):
                self.assertSyntax(mail, arg, 501, "5.1.7")

    def test_params(self) -> None:
        _, params = mail("FROM:<a@b.com> size=5 smtputf8 ENVID=abc+2Bdef  RET=HDRS ")
        self.assertEqual(params, {"SIZE": "5", "SMTPUTF8": "", "ENVID": "abc+2Bdef", "RET": "HDRS"})

    def test_bad_params(self) -> None:
        for arg in [
            "FROM:<a@b.com> SIZE=",
            "FROM:<a@b.com> =5",
            "FROM:<a@b.com> SIZE=1=2",
            "FROM:<a@b.com> -SIZE=1",
            "FROM:<a@b.com> SI_ZE=1",
            "FROM:<a@b.com> SIZE=1\t",
            "FROM:<a@b.com> ENVID=\u00e9",
        ]:
            with self.subTest(arg=arg):
                self.assertSyntax(mail, arg, 501, "5.5.4")

    def test_duplicate_params(self) -> None:
        with self.assertRaises(AddressError) as caught:
            mail("FROM:<a@b.com> SIZE=1 size=2")
        self.assertEqual(caught.exception.reply, Reply(501, "5.5.4", "Duplicate parameter SIZE"))

    def test_source_route_dropped_from_sender(self) -> None:
        self.assertEqual(mail("FROM:<@a.test,@b.test:u@c.test>")[0], Address("u", "c.test"))

    def test_bad_source_route(self) -> None:
        for arg in ["FROM:<@a.test u@c.test>", "FROM:<@:u@c.test>", "FROM:<@a.test,b.test:u@c.test>"]:
            with self.subTest(arg=arg):
                self.assertSyntax(mail, arg, 501, "5.1.7")

    def test_non_ascii_needs_smtputf8(self) -> None:
        with self.assertRaises(AddressError) as caught:
            mail("FROM:<j\u00f6rg@b\u00fccher.example>")
        self.assertEqual(caught.exception.reply.code, 553)
        self.assertEqual(caught.exception.reply.enhanced, "5.6.7")
        self.assertIn("SMTPUTF8", caught.exception.reply.text)
        # Offered in the session but not asked for in this command.
        self.assertSyntax(lambda a: mail(a, utf8=True), "FROM:<j\u00f6rg@b\u00fccher.example>", 553, "5.6.7")
        # Asked for but not offered.
        self.assertSyntax(mail, "FROM:<j\u00f6rg@b\u00fccher.example> SMTPUTF8", 553, "5.6.7")

    def test_non_ascii_with_smtputf8(self) -> None:
        address, params = mail("FROM:<j\u00f6rg@B\u00fccher.example> SMTPUTF8", utf8=True)
        self.assertEqual(address, Address("j\u00f6rg", "xn--bcher-kva.example"))
        self.assertEqual(params, {"SMTPUTF8": ""})

    def assertSyntax(self, parse, arg: str, code: int, enhanced: str) -> None:
        with self.assertRaises(AddressError) as caught:
            parse(arg)
        self.assertEqual((caught.exception.reply.code, caught.exception.reply.enhanced), (code, enhanced))


class RcptArgumentTests(SynchronousTestCase):
    assertSyntax = MailArgumentTests.assertSyntax

    def test_plain(self) -> None:
        self.assertEqual(
            rcpt("TO:<u@Local.Test> NOTIFY=NEVER"), (Address("u", "local.test"), {"NOTIFY": "NEVER"})
        )
        self.assertEqual(rcpt("to: <u@local.test>")[0], Address("u", "local.test"))

    def test_postmaster(self) -> None:
        for arg in ["TO:<postmaster>", "TO:<Postmaster>", "TO:<POSTMASTER>"]:
            with self.subTest(arg=arg):
                self.assertEqual(rcpt(arg)[0], Address("postmaster", ""))

    def test_no_domain_other_than_postmaster(self) -> None:
        self.assertSyntax(rcpt, "TO:<abuse>", 501, "5.1.3")
        self.assertSyntax(rcpt, "TO:<postmaster2>", 501, "5.1.3")

    def test_null_recipient(self) -> None:
        self.assertSyntax(rcpt, "TO:<>", 501, "5.1.3")

    def test_bad_recipient_syntax(self) -> None:
        bad = ["TO:", "TO:u@local.test", "TO:<u@local.test", "TO:<u@@local.test>", "TO:<@>", "TO:<u@[]>"]
        for arg in bad:
            with self.subTest(arg=arg):
                self.assertSyntax(rcpt, arg, 501, "5.1.3")
        self.assertSyntax(rcpt, "FROM:<u@local.test>", 501, "5.5.4")

    def test_source_route_declined(self) -> None:
        with self.assertRaises(AddressError) as caught:
            rcpt("TO:<@local.test:u@evil.com>")
        self.assertEqual(caught.exception.reply.code, 553)
        self.assertEqual(caught.exception.reply.enhanced, "5.7.1")

    def test_quoted_local_part(self) -> None:
        self.assertEqual(rcpt('TO:<"abc"@local.test>')[0], Address("abc", "local.test"))
        self.assertEqual(rcpt('TO:<"a\\b.c"@local.test>')[0], Address("ab.c", "local.test"))
        self.assertEqual(rcpt('TO:<"a b"@local.test>')[0], Address('"a b"', "local.test"))
        self.assertEqual(rcpt('TO:<"a\\"b"@local.test>')[0], Address('"a\\"b"', "local.test"))
        self.assertEqual(rcpt('TO:<"a>b"@local.test>')[0], Address('"a>b"', "local.test"))
        self.assertEqual(rcpt('TO:<"a..b"@local.test>')[0], Address('"a..b"', "local.test"))
        self.assertEqual(rcpt('TO:<""@local.test>')[0], Address('""', "local.test"))

    def test_address_literals(self) -> None:
        self.assertEqual(rcpt("TO:<u@[192.0.2.1]>")[0], Address("u", "[192.0.2.1]"))
        self.assertEqual(rcpt("TO:<u@[ipv6:2001:DB8:0::1]>")[0], Address("u", "[IPv6:2001:db8::1]"))
        self.assertEqual(rcpt("TO:<u@[IPv6:::ffff:192.0.2.1]>")[0].domain, "[IPv6:::ffff:c000:201]")
        for arg in [
            "TO:<u@[192.0.2]>",
            "TO:<u@[256.0.0.1]>",
            "TO:<u@[01.2.3.4]>",
            "TO:<u@[IPv6:zz::1]>",
            "TO:<u@[IPv6:fe80::1%eth0]>",
            "TO:<u@[192.0.2.1>",
            "TO:<u@[[192.0.2.1]]>",
        ]:
            with self.subTest(arg=arg):
                self.assertSyntax(rcpt, arg, 501, "5.1.3")
        self.assertSyntax(rcpt, "TO:<u@[x-tag:abc]>", 553, "5.1.3")

    def test_local_part_length(self) -> None:
        self.assertEqual(rcpt(f"TO:<{'a' * 64}@local.test>")[0].local, "a" * 64)
        self.assertSyntax(rcpt, f"TO:<{'a' * 65}@local.test>", 501, "5.1.3")
        self.assertSyntax(rcpt, f'TO:<"{"a b" * 21}"@local.test>', 501, "5.1.3")  # 65 with the quotes

    def test_path_length(self) -> None:
        # 1 + 64 + 1 + 189 + 1 = 256 octets: the longest path.
        domain = ".".join(["d" * 62, "d" * 62, "d" * 63])
        self.assertEqual(len(domain), 189)
        self.assertEqual(rcpt(f"TO:<{'a' * 64}@{domain}>")[0].domain, domain)
        self.assertSyntax(rcpt, f"TO:<{'a' * 64}@x{domain}>", 501, "5.1.3")

    def test_utf8_recipient(self) -> None:
        self.assertSyntax(rcpt, "TO:<\u7528\u6237@\u4f8b\u5b50.test>", 553, "5.6.7")
        address = rcpt("TO:<\u7528\u6237@\u4f8b\u5b50.test>", utf8=True)[0]
        self.assertEqual(address, Address("\u7528\u6237", "xn--fsqu00a.test"))
        self.assertEqual(rcpt('TO:<"\u00e9 x"@local.test>', utf8=True)[0].local, '"\u00e9 x"')

    def test_utf8_lengths_are_octets(self) -> None:
        self.assertSyntax(lambda a: rcpt(a, utf8=True), "TO:<" + "\u00e9" * 33 + "@local.test>", 501, "5.1.3")

    def test_surrogates_are_refused(self) -> None:
        self.assertSyntax(lambda a: rcpt(a, utf8=True), "TO:<a\udcff@local.test>", 501, "5.1.3")


class RelayTrickTests(SynchronousTestCase):
    """Addresses whose local part a downstream MTA might route elsewhere."""

    def test_percent_hack(self) -> None:
        address = rcpt("TO:<u%evil.com@local.test>")[0]
        self.assertEqual(address.domain, "local.test")
        self.assertTrue(address.relay_trick)

    def test_bang_path(self) -> None:
        self.assertTrue(rcpt("TO:<evil.com!u@local.test>")[0].relay_trick)

    def test_quoted_at(self) -> None:
        self.assertTrue(rcpt('TO:<"u@evil.com"@local.test>')[0].relay_trick)
        self.assertTrue(rcpt('TO:<"u\\@evil.com"@local.test>')[0].relay_trick)
        self.assertTrue(rcpt('TO:<"@evil.com:u"@local.test>')[0].relay_trick)
        self.assertTrue(rcpt('TO:<"evil::u"@local.test>')[0].relay_trick)

    def test_double_at_is_a_syntax_error(self) -> None:
        with self.assertRaises(AddressError) as caught:
            rcpt("TO:<u@evil.com@local.test>")
        self.assertEqual(caught.exception.reply.code, 501)
        self.assertEqual(caught.exception.reply.enhanced, "5.1.3")

    def test_source_route_is_declined(self) -> None:
        with self.assertRaises(AddressError) as caught:
            rcpt("TO:<@local.test:u@evil.com>")
        self.assertEqual(caught.exception.reply.enhanced, "5.7.1")

    def test_ordinary_addresses_are_not_tricks(self) -> None:
        for arg in [
            "TO:<u@local.test>",
            "TO:<first.last+tag@local.test>",
            'TO:<"a b"@local.test>',
            "TO:<postmaster>",
            "TO:<o'brien@local.test>",
        ]:
            with self.subTest(arg=arg):
                self.assertFalse(rcpt(arg)[0].relay_trick)


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")


class PropertyTests(SynchronousTestCase):
    @given(_dot_string, _domain)
    def test_round_trip(self, local: str, domain: str) -> None:
        address, params = rcpt(f"TO:<{local}@{domain}>")
        self.assertEqual(address, Address(local, domain))
        self.assertEqual(rcpt(f"TO:<{address}>")[0], address)
        self.assertEqual(params, {})

    @given(_qcontent, _domain)
    def test_quoted_round_trip(self, content: str, domain: str) -> None:
        quoted = '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(quoted) > 64:
            return
        address = rcpt(f"TO:<{quoted}@{domain}>")[0]
        self.assertEqual(rcpt(f"TO:<{address}>")[0], address)
        self.assertEqual(address.relay_trick, any(c in content for c in "%!@:"))

    @given(st.text(max_size=80), st.booleans())
    def test_garbage_gives_only_address_errors(self, text: str, utf8: bool) -> None:
        for parse, prefix in [(parse_mail_argument, "FROM:"), (parse_rcpt_argument, "TO:")]:
            for arg in [text, prefix + text, prefix + "<" + text + ">"]:
                try:
                    address, _ = parse(arg, utf8=utf8)
                except AddressError as exc:
                    self.assertIn(exc.reply.code, (501, 553))
                    self.assertRegex(exc.reply.enhanced, _ENHANCED)
                    continue
                self.assertTrue(str(address).isascii() or utf8)
                self.assertNotIn(">", address.domain)
