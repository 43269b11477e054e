"""Flow control before login: one owner of the client's pause reasons, and the cap on unread answers."""

from __future__ import annotations

from gateway.net.flow import FILTER, LOGIN, OUTPUT, UPSTREAM, Flow, FlowProducer
from gateway.session import MAX_QUEUED_OUTPUT

from test_imap_protocol import connect


class Transport:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")


def test_one_party_cannot_resume_what_another_holds():
    """The transport reads again only when every reason is released; repeats are no-ops."""
    transport = Transport()
    flow = Flow(transport)
    flow.pause(FILTER)
    flow.pause(UPSTREAM)
    flow.pause(UPSTREAM)
    flow.resume(UPSTREAM)
    assert transport.calls == ["pause"] and flow.paused
    flow.resume(LOGIN)  # never paused for this reason: nothing happens
    flow.resume(FILTER)
    assert transport.calls == ["pause", "resume"] and not flow.paused


def test_a_flow_producer_pauses_its_reason_and_never_stops_anything():
    transport = Transport()
    flow = Flow(transport)
    producer = FlowProducer(flow, OUTPUT)
    producer.pauseProducing()
    producer.stopProducing()
    assert flow.holds(OUTPUT) and transport.calls == ["pause"]
    producer.resumeProducing()
    assert not flow.paused


def test_answers_a_client_does_not_read_are_capped():
    """Once the transport says its buffer is full, answers beyond MAX_QUEUED_OUTPUT end the connection."""
    proto, transport, _ = connect(tls=False)
    assert transport.producer is not None  # plaintext: watched from the start
    transport.producer.pauseProducing()   # the client stopped reading
    assert transport.producerState == "paused"  # the flow stopped reading the client
    transport.clear()
    proto.dataReceived(b"a CAPABILITY\r\n" * (MAX_QUEUED_OUTPUT // 60))
    assert transport.disconnected
    assert len(transport.value()) > MAX_QUEUED_OUTPUT


def test_a_client_that_reads_is_never_cut():
    """The same answers with the buffer draining (no pause): nothing is cut."""
    proto, transport, _ = connect(tls=False)
    transport.clear()
    proto.dataReceived(b"a CAPABILITY\r\n" * (MAX_QUEUED_OUTPUT // 60))
    assert not transport.disconnected and not transport.disconnecting


def test_tls_listeners_watch_only_after_the_handshake():
    """On an implicit-TLS listener the watch starts at handshakeCompleted (earlier it would stall it)."""
    proto, transport, _ = connect(tls=True)
    assert transport.producer is None
    proto.handshakeCompleted()
    assert transport.producer is not None
