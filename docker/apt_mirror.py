"""Print the Debian mirror this machine's apt uses for its release (never a hard-coded host)."""

from __future__ import annotations

import glob
import re
import sys


def release() -> str:
    with open("/etc/os-release") as f:
        match = re.search(r"^VERSION_CODENAME=(\w+)", f.read(), re.M)
    return match.group(1) if match else "bookworm"


def mirror(codename: str) -> str | None:
    # One-line format: "deb [options] URI SUITE COMPONENTS..."
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = re.sub(r"\[[^]]*\]", "", line).split()
            if len(fields) >= 3 and fields[0] == "deb" and fields[2] == codename and "debian" in fields[1]:
                return fields[1]
    # deb822 format: stanzas of "Key: value" lines
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in open(path).read().split("\n\n"):
            keys = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if codename in keys.get("Suites", "").split() and "debian" in keys.get("URIs", ""):
                return keys["URIs"].split()[0]
    return None


if __name__ == "__main__":
    codename = sys.argv[1] if len(sys.argv) > 1 else release()
    found = mirror(codename)
    if found is None:
        sys.exit(f"no Debian mirror for {codename} in this machine's apt configuration")
    print(found)
