#!/usr/bin/env python3
"""Drives a running `phantom-infer serve` with the official `openai` Python package.

    python openai_client.py --base-url http://127.0.0.1:PORT/v1 --image square.png \
        --question "What colour is the square?" --expect "The square is red."

Checks a plain answer, a streamed one (with usage), several images, a multi-turn conversation,
refusals (bad role, oversize max_tokens, unsupported image URL) as the client's typed errors,
then a load test: the same question (48-token answers, `ignore_eos`) from 1, 4 and 16
concurrent streaming clients, every answer checked against a lone request's, with throughput and p50/p95 latency, and 16 whole answers at once against 16 in a row.
Prints one JSON report on stdout and closes with a line `openai: N passed, M failed`.
"""

import argparse
import base64
import json
import statistics
import sys
import threading
import time

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--expect", required=True)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key="not-needed", max_retries=0,
                           timeout=300)
    with open(args.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    picture = {"type": "image_url", "image_url": {"url": url}}
    ask = [{"role": "user", "content": [picture, {"type": "text", "text": args.question}]}]
    passed, failed, report = 0, [], {}

    def check(name, ok, detail=""):
        nonlocal passed
        if ok:
            passed += 1
        else:
            failed.append(f"{name}: {detail}")
        print(f"openai: {'ok  ' if ok else 'FAIL'} {name} {detail if not ok else ''}",
              file=sys.stderr, flush=True)

    models = client.models.list()
    check("models", len(models.data) == 1 and models.data[0].object == "model",
          repr(models.data))

    answer = client.chat.completions.create(model=models.data[0].id, messages=ask,
                                            max_tokens=args.max_tokens, temperature=0)
    text = answer.choices[0].message.content
    check("plain answer", text == args.expect, repr(text))
    check("usage", answer.usage.total_tokens
          == answer.usage.prompt_tokens + answer.usage.completion_tokens, repr(answer.usage))
    check("finish reason", answer.choices[0].finish_reason == "stop",
          answer.choices[0].finish_reason)

    pieces, usage, reasons = [], None, []
    for chunk in client.chat.completions.create(
            model="phantom", messages=ask, max_tokens=args.max_tokens, stream=True,
            stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    check("streamed answer", "".join(pieces) == args.expect, repr("".join(pieces)))
    check("streamed usage", usage is not None and usage.completion_tokens > 0, repr(usage))
    check("streamed finish", reasons == ["stop"], repr(reasons))

    two = [{"role": "user", "content": [picture, picture,
                                        {"type": "text", "text": args.question}]}]
    answer = client.chat.completions.create(model="phantom", messages=two,
                                            max_tokens=args.max_tokens)
    check("two images", bool(answer.choices[0].message.content), repr(answer))

    turns = ask + [{"role": "assistant", "content": args.expect},
                   {"role": "user", "content": "And again?"}]
    answer = client.chat.completions.create(model="phantom", messages=turns,
                                            max_tokens=args.max_tokens)
    check("multi-turn", answer.choices[0].message.content is not None, repr(answer))

    for name, call in [
        ("unknown role refused", dict(messages=[{"role": "robot", "content": "hi"}])),
        ("oversize max_tokens refused", dict(messages=ask, max_tokens=10_000_000)),
        ("file URL refused", dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}])),
    ]:
        try:
            client.chat.completions.create(model="phantom", **call)
            check(name, False, "no error")
        except openai.BadRequestError as e:
            body = e.body if isinstance(e.body, dict) else {}
            check(name, e.status_code == 400 and "message" in body, repr(e))

    # Load: answers of a fixed length (`ignore_eos`, so that decoding dominates as it does with
    # real answers), every one checked against the answer of a lone request; the clock covers
    # the whole request, stream included.
    load_tokens = 48

    def one(results, i):
        start = time.perf_counter()
        pieces, first, tokens = [], None, 0
        for chunk in client.chat.completions.create(
                model="phantom", messages=ask, max_tokens=load_tokens, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            for choice in chunk.choices:
                if choice.delta.content:
                    if first is None:
                        first = time.perf_counter() - start
                    pieces.append(choice.delta.content)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        results[i] = ("".join(pieces), time.perf_counter() - start, first, tokens)

    def at_once(target, clients):
        """Runs `target(results, i)` from `clients` threads at once: results and wall time."""
        results = [None] * clients
        threads = [threading.Thread(target=target, args=(results, i)) for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results, time.perf_counter() - start

    def load(clients, expect):
        results, wall = at_once(one, clients)
        latencies = sorted(r[1] for r in results)
        tokens = sum(r[3] for r in results)
        good = all(r[0] == expect and r[3] == load_tokens for r in results)
        p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
        return good, {"clients": clients, "wall_s": round(wall, 3),
                      "tokens_per_s": round(tokens / wall, 1),
                      "p50_s": round(statistics.median(latencies), 3), "p95_s": round(p(0.95), 3),
                      "first_token_p50_s": round(statistics.median(r[2] for r in results), 3)}

    alone = [None]
    one(alone, 0)
    expect = alone[0][0]
    check("a fixed-length answer starts with the answer", expect.startswith(args.expect),
          repr(expect))
    report["load_answer_tokens"] = load_tokens
    report["load"] = []
    for clients in (1, 4, 16):
        good, row = load(clients, expect)
        report["load"].append(row)
        check(f"{clients} concurrent streams answer alike", good, json.dumps(row))

    # Batching, whole answers (the client parses one JSON body, not a chunk per token, so the
    # clock measures the server): 16 in a row against 16 at once.
    def whole(results, i):
        answer = client.chat.completions.create(
            model="phantom", messages=ask, max_tokens=load_tokens, extra_body={"ignore_eos": True})
        results[i] = answer.choices[0].message.content

    results = [None] * 16
    start = time.perf_counter()
    for i in range(16):
        whole(results, i)
    in_a_row = time.perf_counter() - start
    check("16 in a row answer alike", all(r == expect for r in results), repr(set(results)))
    results, concurrent = at_once(whole, 16)
    check("16 at once answer alike", all(r == expect for r in results), repr(set(results)))
    report["sixteen_in_a_row_s"] = round(in_a_row, 3)
    report["sixteen_concurrent_s"] = round(concurrent, 3)
    report["batching_speedup"] = round(in_a_row / concurrent, 2)
    check("16 concurrent at least 2x faster than 16 in a row", in_a_row >= 2 * concurrent,
          f"{in_a_row:.2f} s vs {concurrent:.2f} s")

    print(json.dumps(report))
    print(f"openai: {passed} passed, {len(failed)} failed")
    for f in failed:
        print(f"  {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
