#!/usr/bin/env python3
"""An S3-compatible server on 127.0.0.1 for tests: moto's, with SigV4 checked against the keys
it issued. Creates an IAM user allowed s3:*, a bucket, and uploads DIR into it (a binary cache).

Prints "PORT <n>" and "KEY <access key id> <secret key>", then serves until SIGTERM/SIGINT.
"""
import argparse, json, os, signal, sys, threading

p = argparse.ArgumentParser()
p.add_argument("--dir", required=True)
p.add_argument("--bucket", default="nix-cache")
p.add_argument("--region", default="eu-west-1")
args = p.parse_args()

# Requests are unauthenticated only until the user and its key exist (three IAM calls); from
# then on every request must carry a valid signature of that key. Read when moto is imported.
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
import boto3
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
_, port = server.get_host_and_port()
endpoint = f"http://127.0.0.1:{port}"
iam = boto3.client("iam", endpoint_url=endpoint, region_name=args.region, aws_access_key_id="setup", aws_secret_access_key="setup")
iam.create_user(UserName="nixfs")
iam.put_user_policy(
    UserName="nixfs", PolicyName="s3",
    PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="nixfs")["AccessKey"]
s3 = boto3.client(
    "s3", endpoint_url=endpoint, region_name=args.region,
    aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
s3.create_bucket(Bucket=args.bucket, CreateBucketConfiguration={"LocationConstraint": args.region})
root = os.path.realpath(args.dir)
for dirpath, _, files in os.walk(root):
    for name in files:
        path = os.path.join(dirpath, name)
        s3.upload_file(path, args.bucket, os.path.relpath(path, root))

print(f"PORT {port}", flush=True)
print(f"KEY {key['AccessKeyId']} {key['SecretAccessKey']}", flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: done.set())
signal.signal(signal.SIGINT, lambda *a: done.set())
done.wait()
server.stop()
