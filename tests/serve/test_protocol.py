"""CorkedTransport: what uvicorn writes for one response within one event-loop turn leaves in one write."""

import asyncio

from mcc_serve.protocol import MAX_HELD_BYTES, CorkedTransport


class FakeTransport:
    def __init__(self):
        self.writes, self.closed, self.aborted = [], False, False

    def write(self, data):
        assert not self.closed
        self.writes.append(data)

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = self.closed = True

    def get_write_buffer_size(self):
        return 0

    def write_eof(self):
        self.eof = True

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default


def test_writes_of_one_turn_leave_together_in_order():
    async def run():
        fake = FakeTransport()
        corked = CorkedTransport(fake, asyncio.get_running_loop())
        corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        corked.write(memoryview(b"{}"))
        assert fake.writes == [] and corked.get_write_buffer_size() == 40
        await asyncio.sleep(0)  # the end of this turn
        assert fake.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        corked.writelines([b"a", b"b"])
        await asyncio.sleep(0)
        assert fake.writes[1:] == [b"ab"]
        assert corked.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest goes straight through

    asyncio.run(run())


def test_close_sends_what_is_held_first_and_abort_drops_it():
    async def run():
        fake = FakeTransport()
        corked = CorkedTransport(fake, asyncio.get_running_loop())
        corked.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        corked.close()
        assert fake.writes == [b"HTTP/1.1 408 Request Timeout\r\n\r\n"] and fake.closed
        await asyncio.sleep(0)  # the scheduled flush finds nothing, and writes nothing to the closed transport
        assert len(fake.writes) == 1

        fake = FakeTransport()
        corked = CorkedTransport(fake, asyncio.get_running_loop())
        corked.write(b"partial")
        corked.abort()
        await asyncio.sleep(0)
        assert fake.writes == [] and fake.aborted

        fake = FakeTransport()  # the peer went away before the turn ended: nothing is written to a closing transport
        corked = CorkedTransport(fake, asyncio.get_running_loop())
        corked.write(b"late")
        fake.closed = True
        await asyncio.sleep(0)
        assert fake.writes == []

    asyncio.run(run())


def test_a_large_answer_is_not_held_and_eof_comes_after_what_was_held():
    async def run():
        fake = FakeTransport()
        corked = CorkedTransport(fake, asyncio.get_running_loop())
        corked.write(b"head")
        corked.write(bytes(MAX_HELD_BYTES))  # reaches the transport (and its flow control) at once
        assert fake.writes == [b"head" + bytes(MAX_HELD_BYTES)] and corked.get_write_buffer_size() == 0
        corked.write(b"tail")
        corked.write_eof()
        assert fake.writes[1:] == [b"tail"] and fake.eof
        await asyncio.sleep(0)
        assert len(fake.writes) == 2

    asyncio.run(run())
