"""The ground floor: what every package shares and none owns.

The event loop that drives hivemind's async P2P from threaded code (`loop`), joining the DHT (`dht`), a
peer's Ed25519 identity (`identity`), private-swarm membership (`membership`), the DHT key names
(`keys`), the canonical encoding that is signed and hashed (`encoding`), and files written atomically
(`files`). It imports no other swarmlm package; every other package may import it.
"""
