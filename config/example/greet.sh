#!/bin/sh
echo "hello from buildfleet, built on $(uname -m)"
