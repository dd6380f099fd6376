# Sourced by scripts/bench.sh --profile: profiles a second cachefront (same config, same
# Valkey and PostgreSQL) while redis-benchmark sends BENCH_PROFILE_N requests of
#   1. EMP.GET 1 (a hit: the in-process L1 after the first request)
#   2. the same, pipelined 16 deep
#   3. GET key:000000000000 (pass-through)
# at 50 clients, and prints the top functions by self cost of each.
# perf (cycles/instructions sampling) when the CPU's counters work
# (`perf stat -e instructions true`), else valgrind's callgrind (instructions executed;
# counting only the benchmark: statistics zeroed before, dumped after).
# Uses from bench.sh: CACHEFRONT CONFIG CFP_PORT WORK start_cachefront wait_port say die.

PROFILE_N="${BENCH_PROFILE_N:-20000}"
PROFILE_TOP="${BENCH_PROFILE_TOP:-10}"

profile_tool=callgrind
if command -v perf >/dev/null 2>&1 && perf stat -e instructions -x, true 2>&1 | grep -q '^[0-9]'; then
    profile_tool=perf
fi
if [[ "$profile_tool" == callgrind ]] && ! command -v valgrind >/dev/null 2>&1; then
    say "apt-get install valgrind"
    apt_install valgrind
fi

profile_workloads=("EMP.GET 1 hit|EMP.GET 1" "EMP.GET 1 hit, -P 16|-P 16 EMP.GET 1" "pass-through GET|-t get")

echo "# profiles ($profile_tool; $PROFILE_N requests, 50 clients, -P 1 unless the heading says otherwise; release build with debug = 1)"
if [[ "$profile_tool" == callgrind ]]; then
    start_cachefront "$CFP_PORT" valgrind --tool=callgrind --quiet --vgdb=yes \
        --callgrind-out-file="$WORK/callgrind.out" --dump-instr=no --collect-jumps=no
    CFP_PID=$STARTED_PID
    wait_port "$CFP_PORT" 120 "cachefront under callgrind"
    redis-cli -p "$CFP_PORT" EMP.GET 1 >/dev/null
    redis-benchmark -p "$CFP_PORT" -c 50 -n 2000 -q EMP.GET 1 >/dev/null 2>&1 || true
    redis-benchmark -p "$CFP_PORT" -c 50 -n 2000 -q -t get >/dev/null 2>&1 || true
    i=0
    for w in "${profile_workloads[@]}"; do
        label="${w%%|*}"
        read -r -a wargs <<<"${w#*|}"
        i=$((i + 1))
        callgrind_control -z "$CFP_PID" >/dev/null
        rb_out="$(redis-benchmark -p "$CFP_PORT" -c 50 -n "$PROFILE_N" -q "${wargs[@]}" 2>&1 | tr "\r" "\n" | grep -v "^ *$" | tail -n 1)"
        callgrind_control -d "profile-$i" "$CFP_PID" >/dev/null
        sleep 1
        f="$(ls -t "$WORK"/callgrind.out* | head -n 1)"
        cp "$f" "$WORK/profile-$i.callgrind"
        echo
        echo "## $label — top $PROFILE_TOP functions by self cost (instructions, all threads)"
        echo "redis-benchmark under callgrind: $rb_out"
        echo '```text'
        { callgrind_annotate --inclusive=no --threshold=100 "$f" 2>/dev/null || true; } >"$WORK/profile-$i.txt"
        # Functions still on a thread's stack when the statistics were zeroed (thread start,
        # the tokio worker loop) show up with ~100% "self" cost at the dump: left out.
        awk '/file:function/ {on = 1; next}
             on && NF && !/^-+$/ {p = $2; gsub(/[(%)]/, "", p); if (p + 0 < 90) print}' "$WORK/profile-$i.txt" |
            head -n "$PROFILE_TOP" |
            sed -E 's#/root/\.cargo/registry/src/[^/]+/##; s#/rustc/[0-9a-f]+/library/#std:#; s# \[[^]]*\]$##' || true
        echo '```'
        total="$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$WORK/profile-$i.txt")"
        echo "total: ${total:-?} instructions, $(( ${total:-0} / PROFILE_N )) per request"
    done
    kill -TERM "$CFP_PID" 2>/dev/null || true
    wait "$CFP_PID" 2>/dev/null || true
else
    start_cachefront "$CFP_PORT"
    CFP_PID=$STARTED_PID
    wait_port "$CFP_PORT" 20 "cachefront (profiled)"
    redis-cli -p "$CFP_PORT" EMP.GET 1 >/dev/null
    i=0
    for w in "${profile_workloads[@]}"; do
        label="${w%%|*}"
        read -r -a wargs <<<"${w#*|}"
        i=$((i + 1))
        perf record -q -F 2000 -g -p "$CFP_PID" -o "$WORK/perf-$i.data" &
        perf_pid=$!
        sleep 0.5
        redis-benchmark -p "$CFP_PORT" -c 50 -n "$PROFILE_N" -q "${wargs[@]}" >/dev/null 2>&1
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
        echo
        echo "## $label — top $PROFILE_TOP functions by self cost (perf samples)"
        echo '```text'
        { perf report -i "$WORK/perf-$i.data" --no-children --sort symbol --stdio 2>/dev/null || true; } |
            grep -E '^ +[0-9.]+%' | head -n "$PROFILE_TOP" || true
        echo '```'
    done
    kill -TERM "$CFP_PID" 2>/dev/null || true
    wait "$CFP_PID" 2>/dev/null || true
fi
