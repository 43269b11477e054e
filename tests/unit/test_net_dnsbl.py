"""DNSBL pieces without I/O: query names, zone names, what an A answer means, CSV import and export."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.net.dnsbl import (MAX_ZONES, CsvError, Zone, parse_csv, parse_nameservers, parse_zones, query_name,
                               verdict, zone_host, zones_csv)


def test_query_name_reverses_ipv4_octets_and_ipv6_nibbles():
    assert query_name("127.0.0.3", "bl.test") == "3.0.0.127.bl.test"
    assert query_name("192.0.2.99", "zen.spamhaus.org") == "99.2.0.192.zen.spamhaus.org"
    assert query_name("2001:db8::1", "bl.test") == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test")
    assert query_name("::1", "v6.bl.test").split(".")[:32] == ["1"] + ["0"] * 31


@pytest.mark.parametrize("answers, listed, code", [
    ([], False, None),
    (["127.0.0.2"], True, "127.0.0.2"),
    (["127.0.0.10", "127.0.0.4", "127.0.0.4"], True, "127.0.0.4,127.0.0.10"),
    (["127.255.255.254"], None, "127.255.255.254"),     # Spamhaus: query through a public resolver
    (["127.255.255.252", "127.0.0.2"], True, "127.0.0.2"),
    (["192.0.2.1"], None, "192.0.2.1"),                 # a wildcard, not a DNSBL answer
])
def test_verdict_reads_listing_codes_and_never_takes_an_error_code_for_clean(answers, listed, code):
    found = verdict(answers)
    assert (found.listed, found.code) == (listed, code)
    assert (found.why is None) == (listed is not None)


@pytest.mark.parametrize("text", ["", " ", "bl", "bl..test", "-bl.test", "bl.test-", "bl test.org",
                                  "bläck.test", "10.0.0.1", "a." * 100 + "org", 3, None])
def test_bad_zone_names_are_refused(text):
    with pytest.raises(ValueError):
        zone_host(text)


def test_zone_names_are_canonical():
    assert zone_host(" ZEN.Spamhaus.org. ") == "zen.spamhaus.org"
    assert zone_host("b.barracudacentral.org") == "b.barracudacentral.org"
    assert zone_host("_dnsbl.example.net") == "_dnsbl.example.net"


def test_zone_lists_name_their_bad_entry_and_refuse_duplicates():
    assert parse_zones([{"host": "bl.test"}, {"host": "b.test", "name": "B"}]) == (
        Zone("bl.test", "bl.test"), Zone("b.test", "B"))
    with pytest.raises(ValueError, match=r"zones\[1\]\.host: bl.test is listed twice"):
        parse_zones([{"host": "bl.test"}, {"host": "BL.test."}])
    with pytest.raises(ValueError, match=r"zones\[0\]: unknown field rbl"):
        parse_zones([{"host": "bl.test", "rbl": 1}])
    with pytest.raises(ValueError, match=r"zones\[0\]\.name"):
        parse_zones([{"host": "bl.test", "name": "a\x00b"}])
    with pytest.raises(ValueError, match="at most"):
        parse_zones([{"host": f"z{i}.test"} for i in range(MAX_ZONES + 1)])


def test_nameservers():
    assert parse_nameservers(["127.0.0.1:5353", "192.0.2.53", "[::1]:53", "::1"]) == (
        ("127.0.0.1", 5353), ("192.0.2.53", 53), ("::1", 53), ("::1", 53))
    for bad in ("localhost:53", "127.0.0.1:0", "127.0.0.1:x", "[::1]x"):
        with pytest.raises(ValueError):
            parse_nameservers([bad])


ZONES = (Zone("zen.spamhaus.org", "Spamhaus ZEN"), Zone("b.barracudacentral.org", "Barracuda, \"BRBL\""),
         Zone("bl.test", "bl.test"))


def test_csv_round_trip_with_header_quotes_and_commas():
    data = zones_csv(ZONES)
    assert data.startswith(b"rbl_hostname,rbl_name\r\nzen.spamhaus.org,Spamhaus ZEN\r\n")
    assert parse_csv(data) == ZONES


def test_csv_header_is_optional_names_may_be_left_out_and_blank_and_comment_lines_are_skipped():
    text = "\ufeff# our zones\nZEN.spamhaus.org,Spamhaus ZEN\n\n  bl.test  \nb.test,\n"
    assert parse_csv(text.encode()) == (Zone("zen.spamhaus.org", "Spamhaus ZEN"), Zone("bl.test", "bl.test"),
                                        Zone("b.test", "b.test"))


def test_csv_bad_rows_are_reported_by_line_number_and_nothing_is_returned():
    text = ("rbl_hostname,rbl_name\n"      # 1
            "zen.spamhaus.org,ZEN\n"       # 2
            "not a zone,X\n"               # 3
            "\n"                           # 4
            "bl.test,A,extra\n"            # 5
            "ZEN.spamhaus.org,again\n"     # 6
            "ok.test,fine\n")              # 7
    with pytest.raises(CsvError) as info:
        parse_csv(text.encode())
    assert [line for line, _ in info.value.problems] == [3, 5, 6]
    message = str(info.value)
    assert message.startswith("3 bad rows, nothing imported: line 3: ")
    assert "line 5: expected 2 columns (rbl_hostname,rbl_name), got 3" in message
    assert "line 6: zen.spamhaus.org is already on line 2" in message


def test_csv_header_only_later_in_the_file_is_a_bad_row_and_empty_files_are_refused():
    with pytest.raises(CsvError, match="line 2"):
        parse_csv(b"bl.test,A\nrbl_hostname,rbl_name\n")
    with pytest.raises(CsvError, match="no zones"):
        parse_csv(b"rbl_hostname,rbl_name\r\n")
    with pytest.raises(CsvError, match="line 2: not UTF-8"):
        parse_csv(b"bl.test,A\nb.test,\xff\n")


def test_csv_with_more_than_the_maximum_of_zones_is_refused():
    rows = "".join(f"z{i}.test,Z{i}\n" for i in range(MAX_ZONES + 1)).encode()
    with pytest.raises(CsvError, match=f"at most {MAX_ZONES}"):
        parse_csv(rows)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_csv_import_of_any_bytes_gives_zones_or_a_csv_error(data):
    """Never another exception: the API turns CsvError into a 400 naming lines."""
    try:
        zones = parse_csv(data)
    except CsvError as e:
        assert e.problems and all(line >= 1 for line, _ in e.problems)
    else:
        assert zones and len({z.host for z in zones}) == len(zones)
        assert parse_csv(zones_csv(zones)) == zones
