"""The serving fleet: what runs on fleet hosts (Ray Serve replicas) and drives them."""
