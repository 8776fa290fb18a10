"""Command line of the course: ``python -m course_utils doctor | run | compare | bench | labs``."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the chosen command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m course_utils", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check Python, libraries, GPU, default model, disk and memory")
    run = sub.add_parser("run", help="execute the lessons into build/ and write build/summary.md")
    run.add_argument("--model", help="'default' (offline) or a Hugging Face model id")
    run.add_argument("--device", help="cpu, cuda or auto (default: auto)")
    run.add_argument("--out", help="output folder (default: build/)")
    run.add_argument("--only", nargs="*", help="lesson number prefixes to run, e.g. 01 03")
    cmp = sub.add_parser("compare", help="measure every method on this machine and model into build/compare/")
    cmp.add_argument("--model", help="'default' (offline) or a Hugging Face model id")
    cmp.add_argument("--device", help="cpu, cuda or auto (default: auto)")
    cmp.add_argument("--out", help="output folder (default: build/compare)")
    cmp.add_argument("--only", nargs="*", help="methods to keep, e.g. float RTN GPTQ AWQ GGUF")
    cmp.add_argument("--library-bits", nargs="*", type=int, default=[4],
                     help="bits at which GPTQModel and llm-compressor quantize too (default: 4; '4 3' adds 3 bits)")
    bench = sub.add_parser("bench", help="decode tokens/s of float, own int8/int4 and llama.cpp rows into build/bench/")
    bench.add_argument("--rounds", type=int, default=5, help="turns over all rows (default 5)")
    bench.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per measurement (default 128)")
    bench.add_argument("--only", nargs="*", help="rows to keep, e.g. 'float fp32' 'rtn int4' 'llama.cpp Q4_0'")
    bench.add_argument("--out", help="output folder (default: build/bench)")
    labs = sub.add_parser("labs", help="generate labs/ from solutions/ (exercise cells replaced by stubs)")
    labs.add_argument("--check", action="store_true", help="only report labs that are out of date (exit 1)")
    args = parser.parse_args(argv)

    if args.command == "labs":
        from course_utils import config, labs as lab_tools

        stale = lab_tools.sync(config.repo_root(), check=args.check)
        for path in stale:
            print(f"{'out of date' if args.check else 'wrote'}: {path.relative_to(config.repo_root())}")
        return 1 if args.check and stale else 0

    if args.command == "compare":
        from course_utils import compare, compare_report, config

        start = time.perf_counter()
        rows = compare.run(args.model, args.device, args.only, library_bits=tuple(args.library_bits))
        files = compare_report.write(rows, args.out or config.repo_root() / "build" / "compare")
        print(compare_report.to_markdown(rows))
        print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s; written: " + ", ".join(str(p) for p in files.values()))
        return 0

    if args.command == "bench":
        from course_utils import bench as bench_tools, config

        start = time.perf_counter()
        with bench_tools.quiet():
            rows = bench_tools.run(rounds=args.rounds, new_tokens=args.new_tokens, only=args.only)
        path = bench_tools.write(rows, args.out or config.repo_root() / "build" / "bench")
        print(bench_tools.to_markdown(rows))
        print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s; written: {config.display_path(path)}")
        return 0

    if args.command == "doctor":
        from course_utils import doctor

        checks = doctor.run_checks()
        print(doctor.report(checks))
        return 1 if any(c.status == "FAIL" for c in checks) else 0

    from course_utils import runner

    try:
        runs = runner.run_course(args.model, args.device, args.out, args.only)
    except ValueError as err:  # the model cannot run on this machine: said before anything was loaded
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
