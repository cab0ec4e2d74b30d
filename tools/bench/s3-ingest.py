"""How fast the S3 endpoint of tools/test-env.sh ingests segment-sized PUTs on its own.

The ceiling for nbds3d's write throughput against that store: compare with the
nbds3d-s3 rows of tools/bench/run.sh. Runs with the venv test-env.sh sets up
(boto3 comes with moto):

    source tools/test-env.sh
    "$NBDS3_VENV/bin/python" tools/bench/s3-ingest.py [MiB per PUT] [threads] [seconds]

Defaults: 8 MiB (a segment), 8 threads (nbds3d's uploads in flight), 20 s. Prints
PUTs and MiB/s. Objects go under ingest/ in the test bucket (the test env is thrown
away with its data dir).
"""
import os
import sys
import threading
import time

import boto3
from botocore.config import Config


def main():
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    secs = float(sys.argv[3]) if len(sys.argv) > 3 else 20
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["NBDS3_TEST_S3_ENDPOINT"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(max_pool_connections=threads, s3={"payload_signing_enabled": False}),
    )
    bucket = os.environ["NBDS3_TEST_S3_BUCKET"]
    body = os.urandom(mib << 20)
    counts = [0] * threads
    stop = time.time() + secs

    def worker(i):
        while time.time() < stop:
            s3.put_object(Bucket=bucket, Key=f"ingest/{i}/{counts[i]}", Body=body)
            counts[i] += 1

    start = time.time()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.time() - start
    n = sum(counts)
    print(f"{mib} MiB x {threads} threads, {took:.1f} s: {n} PUTs, {n * mib / took:.1f} MiB/s")


if __name__ == "__main__":
    main()
