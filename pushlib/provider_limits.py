"""What APNs and FCM accept, defined once: the parsers, payload builders, clients and the sandbox
providers all check against these numbers.
"""

from __future__ import annotations

#: APNs: largest payload of an alert/background push, and of a VoIP (PushKit) push, in bytes.
APNS_PAYLOAD_BYTES = 4096
APNS_VOIP_PAYLOAD_BYTES = 5120
#: APNs: largest `apns-collapse-id` header value, in bytes.
APNS_COLLAPSE_ID_BYTES = 64
#: APNs device tokens are hex: 32 bytes today (64 digits), up to 100 bytes allowed for.
APNS_TOKEN_MIN_HEX = 64
APNS_TOKEN_MAX_HEX = 200

#: FCM: largest `data` (plus `notification`) of a message, counted over its JSON, in bytes.
FCM_DATA_BYTES = 4096
#: FCM: longest time-to-live it accepts (28 days), in seconds.
FCM_MAX_TTL_SECONDS = 28 * 24 * 3600

#: Ours, not a provider's: the longest push token (or other push parameter) a REGISTER may carry.
MAX_TOKEN_BYTES = 4096
