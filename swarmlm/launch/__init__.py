"""Local launchers: real `swarmlm` processes on this machine, for the demos, the tests and the benchmarks.

`peers.py` starts `swarmlm peer` processes (and whole local swarms), `servers.py` a `swarmlm serve`,
`trainers.py` `swarmlm train` peers; `demo_serve.py` and `demo_train.py` are `swarmlm demo [train]`. Each
process runs in its own process group, so stopping it stops its DHT and p2pd children too. The product
packages never import this one.
"""
