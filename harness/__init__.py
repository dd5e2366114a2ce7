"""Test, benchmark and demo tooling: not part of the product, never imported by `pushlib`.

- `harness.localrun`: free ports, a private redis-server, stopping processes by PID;
- `harness.localstack`: the whole stack on loopback (Redis + sandbox + Kamailio) and SIPp runners;
- `harness.sipua`: a small SIP test phone (REGISTER with digest auth, raw requests, answers);
- `harness.nginx`: a private nginx HTTP/2 endpoint answering like APNs/FCM, and its test PKI;
- `harness.demo`, `harness.demo_pushes`: `make demo` and the push-kind tour;
- `harness.sipfuzz`: a seeded SIP request fuzzer and the checks a fuzz run ends with.
It resolves paths against the source checkout (kamailio/, kemi/, sipp-scenarios/).
"""
