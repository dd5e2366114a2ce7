"""Test and demo tooling that is not part of the product: never imported by `pushlib`.

- `harness.sipfuzz`: a seeded SIP request fuzzer (UDP/TCP senders) and the checks a fuzz run
  ends with (Kamailio alive, its log clean, a legitimate call still completes).
"""
