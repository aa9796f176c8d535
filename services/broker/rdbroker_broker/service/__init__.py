"""The broker's use cases, one module per concept, reached through `BrokerService`:

broker      BrokerService: the one object callers hold; each method hands over to a concept
core        the store, settings, clock and the transaction runner (retries lost races)
routing     Route: validate, pick the pool, decide in one transaction, answer
route_paths the store-specific first try of a Route (PostgreSQL statement, SQLite calls)
placement   the steps of a Route in its transaction: token, reconnect, new placement
failover    a Route after the proxy could not reach a server (probe, move or keep)
reports     connection reports (opened, closed) from proxies
sweeping    proxies' heartbeats and the sweep (expiry, silent proxies, purge)
sessions    where a user is, listing sessions, ending one
servers     servers and pools: list, register, change, remove
changes     operators' changes with their audit record, the audit trail
common      input checks, a pool's account rules, finding a pool by name
"""

from rdbroker_broker.service.broker import BrokerService
from rdbroker_broker.service.reports import Closed, ConnectionEvent, Opened

__all__ = ["BrokerService", "Closed", "ConnectionEvent", "Opened"]
