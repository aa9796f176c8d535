"""Which connection reports of a batch apply as one statement on PostgreSQL: an open and the close
of the same connection and session, with nothing of either between them (`_statement_groups`)."""

from __future__ import annotations

from rdbroker_broker.service.reports import Closed, ConnectionEvent, Opened, _statement_groups


def groups(*events: ConnectionEvent) -> list[list[int]]:
    return _statement_groups(events, list(range(len(events))))


def test_an_open_takes_its_close_along_in_its_own_place():
    assert groups(
        Opened("s1", "c1", "p"),
        Opened("s2", "c2", "p"),
        Closed("s2", "c2"),
        Closed("s1", "c1"),
    ) == [[0, 3], [1, 2]]


def test_another_event_of_the_session_between_them_keeps_them_apart():
    # The close of c1 finds the session active on c2: applied in its own place, it leaves it so.
    assert groups(Opened("s1", "c1", "p"), Opened("s1", "c2", "p"), Closed("s1", "c1")) == [[0], [1], [2]]
    assert groups(Opened("s1", "c1", "p"), Closed("s1", "c9"), Closed("s1", "c1")) == [[0], [1], [2]]


def test_another_session_on_the_same_connection_between_them_keeps_them_apart():
    assert groups(Opened("s1", "c1", "p"), Opened("s2", "c1", "p"), Closed("s1", "c1")) == [[0], [1], [2]]


def test_a_close_of_another_session_or_connection_is_not_a_pair():
    assert groups(Opened("s1", "c1", "p"), Closed("s2", "c1")) == [[0], [1]]
    assert groups(Opened("s1", "c1", "p"), Closed("s1", "c2")) == [[0], [1]]


def test_the_later_open_of_a_repeated_open_pairs():
    # A batch sent again after an outage may repeat an open: only the one right before the close pairs.
    assert groups(Opened("s1", "c1", "p"), Opened("s1", "c1", "p"), Closed("s1", "c1")) == [[0], [1, 2]]


def test_a_close_pairs_once_and_invalid_events_are_left_out():
    events: list[ConnectionEvent] = [
        Opened("s1", "c1", "p"),
        Closed("s1", "c1"),
        Closed("s1", "c1"),
        Opened("", "c2", "p"),
    ]
    assert _statement_groups(events, [0, 1, 2]) == [[0, 1], [2]]
