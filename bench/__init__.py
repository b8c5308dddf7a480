"""Benchmarks: the service against InstructERC's naive generation loop, on one machine."""
