"""The swarm: peers discover each other in a hivemind DHT and serve layer spans over hivemind P2P.

hivemind reads USE_LEGACY_BFLOAT16 at import: with the legacy default it sends bf16 tensors as fp32,
doubling the bytes of every hidden state on the wire. This package's modules import hivemind, and a
package's __init__ runs before its modules, so the setting is always in place first.
"""

import os

os.environ.setdefault("USE_LEGACY_BFLOAT16", "0")
