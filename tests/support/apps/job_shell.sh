#!/usr/bin/env bash
# Test job run with bash: writes its arguments to shell-out.txt.
echo "$@" > shell-out.txt
