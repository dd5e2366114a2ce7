"""pushlib: the push delivery engine of the SIP push-notification proxy.

Everything that does not need Kamailio lives here: push-parameter parsing, the device
and app model with its Redis store, payload builders, the APNs and FCM clients, the
dispatcher and the sandbox providers.
"""
