"""Stress scenarios against a real `tandem serve`, for `tandem stress` and tests/stress.

Each scenario starts its own server subprocess on tiny random-weight models in a temporary
TANDEM_HOME, talks to it over loopback only, is bounded in requests and time, and returns a
`ScenarioResult`: the figures it measured and the checks that failed. `registry.SCENARIOS` maps
names to scenarios; the command runs their long versions, the tests their bounded ones.
`zmq_fuzz` is the ZeroMQ protocol fuzzer both drive.
"""
