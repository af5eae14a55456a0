"""IM services: pure-Python logic over the store, testable without a broker."""
