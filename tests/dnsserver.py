"""A tiny authoritative DNS server on 127.0.0.1 (UDP) for the DNS discovery tests.

It answers from ``records`` (``(name, type) → [rdata text]``, names absolute, e.g.
``("mesh.test.", "A"): ["127.0.0.1"]``), which a test may change at any time; a name without
records gets NXDOMAIN. SRV answers carry their targets' A records as glue when ``glue`` is on.
``mode`` makes it misbehave: ``"garbage"`` replies with bytes that are not a DNS message,
``"servfail"`` with SERVFAIL, ``"truncated"`` with an empty answer flagged TC (the client then
asks over TCP, which this server does not serve), ``"silent"`` never replies (a server that is
down). It runs on its own thread, so node
processes and asyncio tests can both use it; ``queries`` counts the questions it got.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

TTL = 5


class DnsServer:
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.mode = "answer"
        self.glue = True
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, client = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.queries += 1
            if self.mode == "silent":
                continue
            if self.mode == "garbage":
                self._sock.sendto(data[:2] + b"\x81\x80\x00\x01\xff\xff\x00\x00junk", client)
                continue
            self._sock.sendto(self.answer(dns.message.from_wire(data)).to_wire(), client)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if self.mode == "truncated":
            response.flags |= dns.flags.TC
            return response
        question = query.question[0]
        name, rdtype = question.name, dns.rdatatype.to_text(question.rdtype)
        rdatas = self.records.get((name.to_text(), rdtype))
        if not rdatas:
            known = any(n == name.to_text() for n, _ in self.records)
            response.set_rcode(dns.rcode.NOERROR if known else dns.rcode.NXDOMAIN)
            return response
        response.answer.append(dns.rrset.from_text_list(name, TTL, "IN", rdtype, rdatas))
        if rdtype == "SRV" and self.glue:
            for rdata in response.answer[0]:
                addresses = self.records.get((rdata.target.to_text(), "A"))
                if addresses:
                    glue = dns.rrset.from_text_list(rdata.target, TTL, "IN", "A", addresses)
                    response.additional.append(glue)
        return response
