module keybroker/bench/loadgen

go 1.19
