"""pushlib: what the SIP push-notification proxy runs in production, apart from Kamailio itself.

Push-parameter parsing, call and access decisions (pure functions the KEMI router in `kemi/` calls),
the device and app model with its Redis store, payload builders, the APNs and FCM clients, the
dispatcher and the operator CLI. Test and demo tooling lives in `harness/`, the sandbox push
providers in `pushsandbox/` (optional extra `sandbox`); neither is imported from here.
"""
