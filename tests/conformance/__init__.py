"""The conformance suite's data: real-kernel traces (data/<kernel>/<scenario>/) and the
harness that records them (harness/). The loader is tests/conformance/traces.py."""
