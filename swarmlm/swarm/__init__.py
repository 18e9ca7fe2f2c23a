"""The swarm: peers announce layer spans in the DHT, clients route sessions through them and fail over."""
