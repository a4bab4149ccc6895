"""Aggregate benches/host_samples.sh output: for the busiest thread, each function's share of
samples, inclusive (on the stack) and exclusive (on top), Rust hashes and generics trimmed.

    python3 benches/host_profile.py samples.txt [--top 40] [--thread NAME]
"""
import argparse
import collections
import re

FRAME = re.compile(r"^#(\d+)\s+(?:0x[0-9a-f]+ in )?(.+?)(?: \(.*\))?(?: at .*| from .*)?$")


def short(name):
    """Drop Rust's hash and every generic argument list (a `<` right after a name), keeping
    qualified paths such as `<Autodiff as FloatTensorOps>::float_add`."""
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    out, depth = [], 0
    for i, ch in enumerate(name):
        if depth:
            depth += (ch == "<") - (ch == ">")
        elif ch == "<" and i and (name[i - 1].isalnum() or name[i - 1] in "_:"):
            depth = 1
        else:
            out.append(ch)
    return "".join(out).replace("::::", "::").strip()


def samples(path):
    """Yield (sample number, thread header, [frames top first])."""
    sample, thread, frames = 0, None, []
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("=== sample"):
            if thread is not None:
                yield sample, thread, frames
            sample, thread, frames = int(line.split()[2]), None, []
        elif line.startswith("Thread"):
            if thread is not None:
                yield sample, thread, frames
            thread, frames = line, []
        elif line.startswith("#") and thread is not None:
            m = FRAME.match(line)
            if m:
                frames.append(short(m.group(2)))
    if thread is not None:
        yield sample, thread, frames


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--thread", default=None, help="substring of the thread header (default: the thread least often idle)")
    args = ap.parse_args()
    idle = ("futex", "epoll_wait", "poll", "nanosleep", "clock_nanosleep", "pthread_cond", "syscall", "__GI___")
    by_thread = collections.defaultdict(list)
    for _, thread, frames in samples(args.file):
        key = re.sub(r"^Thread \d+ \(Thread 0x[0-9a-f]+ \(LWP (\d+)\)\)", r"LWP \1", thread)
        by_thread[key].append(frames)
    def busy(stacks):
        return sum(1 for f in stacks if f and not any(f[0].startswith(i) or i in f[0] for i in idle))
    for key, stacks in sorted(by_thread.items(), key=lambda kv: -busy(kv[1])):
        print(f"{key}: {len(stacks)} samples, {busy(stacks)} not idle")
    if args.thread:
        chosen = [k for k in by_thread if args.thread in k]
    else:
        chosen = [max(by_thread, key=lambda k: busy(by_thread[k]))]
    stacks = [f for k in chosen for f in by_thread[k]]
    n = len(stacks)
    incl, excl = collections.Counter(), collections.Counter()
    for frames in stacks:
        for name in set(frames):
            incl[name] += 1
        if frames:
            excl[frames[0]] += 1
    print(f"\n{chosen}: {n} samples\n-- inclusive")
    for name, c in incl.most_common(args.top):
        print(f"{100 * c / n:5.1f}%  {name[:150]}")
    print("-- exclusive (top of stack)")
    for name, c in excl.most_common(args.top // 2):
        print(f"{100 * c / n:5.1f}%  {name[:150]}")


if __name__ == "__main__":
    main()
