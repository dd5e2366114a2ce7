"""Local sandbox push providers: APNs provider API, FCM HTTP v1 and an OAuth2 token endpoint
over HTTP/2 + TLS, validating like Apple and Google do and recording what they accept.

Start one with `python -m pushsandbox` or `pushsandbox.process.sandbox_process()`;
drive it with `pushsandbox.control.SandboxControl`.
"""
