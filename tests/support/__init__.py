"""Shared test doubles: loopback servers and fault injection (see ``servers``)."""
