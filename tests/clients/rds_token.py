"""boto3's RDS IAM auth token for fixed inputs, for comparison with
pgbastion's (tests/identity_login.rs). Usage:
rds_token.py HOST PORT USER REGION UNIX_SECONDS ACCESS_KEY_ID SECRET [SESSION_TOKEN]
The signing time is pinned by patching botocore's clock."""
import datetime
import sys
from unittest import mock

import boto3
import botocore.auth

host, port, user, region, at, akid, secret = sys.argv[1:8]
token = sys.argv[8] if len(sys.argv) > 8 else None
fixed = datetime.datetime.fromtimestamp(int(at), datetime.timezone.utc).replace(tzinfo=None)
client = boto3.Session(
    aws_access_key_id=akid,
    aws_secret_access_key=secret,
    aws_session_token=token,
    region_name=region,
).client("rds")
if hasattr(botocore.auth, "get_current_datetime"):
    patch = mock.patch("botocore.auth.get_current_datetime", return_value=fixed)
else:  # older botocore
    patch = mock.patch("botocore.auth.datetime")
with patch as clock:
    if not hasattr(botocore.auth, "get_current_datetime"):
        clock.datetime.utcnow.return_value = fixed
    print(client.generate_db_auth_token(DBHostname=host, Port=int(port), DBUsername=user))
