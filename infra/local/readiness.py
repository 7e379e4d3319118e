"""Readiness checks for the local cluster that start-cluster.sh launches.

    python infra/local/readiness.py s3  --endpoint http://127.0.0.1:9000 --bucket rayformers
        waits until the S3 emulator answers, then makes sure the bucket exists.
    python infra/local/readiness.py ray --gcs 127.0.0.1:6379 --nodes 2 [--dashboard http://127.0.0.1:8265]
        waits until the Ray cluster has that many alive nodes (and, with --dashboard, until the
        Jobs API answers an authenticated request), then prints the head node's IP address.

Token authentication: run with RAY_AUTH_MODE=token in the environment, as every Ray client of
the local cluster must. Exits non-zero with a message when the timeout passes.
"""

from __future__ import annotations

import argparse
import sys
import time

POLL_SECONDS = 0.25


def wait_for_s3(endpoint: str, bucket: str, timeout: float) -> None:
    """Wait until the S3 endpoint accepts requests and `bucket` exists (created if missing)."""
    import boto3
    from botocore.exceptions import ClientError, EndpointConnectionError

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"S3 endpoint {endpoint} did not answer within {timeout:.0f}s") from None
            time.sleep(POLL_SECONDS)


def wait_for_ray(gcs_address: str, nodes: int, dashboard_url: str | None, timeout: float) -> str:
    """Wait for `nodes` alive Ray nodes (and the Jobs API when given); return the head node's IP."""
    import ray

    deadline = time.monotonic() + timeout

    def check_deadline(what: str) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (gave up after {timeout:.0f}s)")

    while True:
        try:
            ray.init(address=gcs_address, logging_level="ERROR", log_to_driver=False)
            break
        except ConnectionError:
            check_deadline(f"could not connect to the Ray head at {gcs_address}")
            time.sleep(POLL_SECONDS)
    try:
        while True:
            alive = [node for node in ray.nodes() if node["Alive"]]
            if len(alive) >= nodes:
                break
            check_deadline(f"only {len(alive)} of {nodes} Ray nodes are alive")
            time.sleep(POLL_SECONDS)
        head = next(node for node in alive if "node:__internal_head__" in node["Resources"])
    finally:
        ray.shutdown()

    if dashboard_url:
        from ray.job_submission import JobSubmissionClient

        while True:
            try:
                JobSubmissionClient(dashboard_url).list_jobs()
                break
            except Exception as error:  # ConnectionError, HTTP 5xx while the job module starts
                check_deadline(f"the Jobs API at {dashboard_url} does not answer: {error}")
                time.sleep(POLL_SECONDS)
    return head["NodeManagerAddress"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    checks = parser.add_subparsers(dest="check", required=True)
    s3 = checks.add_parser("s3", help="wait for the S3 emulator and create the bucket")
    s3.add_argument("--endpoint", required=True)
    s3.add_argument("--bucket", required=True)
    s3.add_argument("--timeout", type=float, default=60)
    ray_check = checks.add_parser("ray", help="wait for alive Ray nodes; print the head node IP")
    ray_check.add_argument("--gcs", required=True, help="HOST:PORT of the head's GCS")
    ray_check.add_argument("--nodes", type=int, required=True, help="alive nodes to wait for, head included")
    ray_check.add_argument("--dashboard", help="http://HOST:PORT of the dashboard whose Jobs API must answer")
    ray_check.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args(argv)

    try:
        if args.check == "s3":
            wait_for_s3(args.endpoint, args.bucket, args.timeout)
        else:
            print(wait_for_ray(args.gcs, args.nodes, args.dashboard, args.timeout))
    except TimeoutError as error:
        print(f"readiness: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
