// Command loadgen is keybroker's compiled load generator: closed-loop HTTPS (mutual TLS,
// keep-alive, HTTP/1.1) at a fixed concurrency for a fixed time, one JSON object on stdout.
//
// Every answer is checked, not only counted: a status other than -status, or a JSON field
// (-field, dotted path) that does not start with -prefix or does not equal -equals, is an
// error, never throughput. Every connection is opened and carries one request before the
// clock starts; then requests that complete inside the measured window (after -warmup, for -t)
// are counted and timed. The generator's own CPU time (user+system, getrusage) is reported so that
// the caller can tell whether the generator, rather than the server, was the limit.
//
// Standard library only: the bench builds it with the distribution's Go toolchain.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

type headerList []string

func (h *headerList) String() string     { return strings.Join(*h, ", ") }
func (h *headerList) Set(v string) error { *h = append(*h, v); return nil }

type config struct {
	url, bodyFile, headersFile, ca, cert, key, field, prefix, equals string
	headers                                                          headerList
	concurrency, status, dialParallel                                int
	duration, warmup                                                 time.Duration
}

type worker struct {
	latencies []time.Duration
	errors    map[string]int
	firstErr  string
}

type report struct {
	Concurrency   int            `json:"concurrency"`
	Seconds       float64        `json:"seconds"`
	OK            int            `json:"ok"`
	Errors        int            `json:"errors"`
	ErrorsByKind  map[string]int `json:"errors_by_kind"`
	FirstError    string         `json:"first_error"`
	RPS           float64        `json:"rps"`
	P50Ms         float64        `json:"p50_ms"`
	P90Ms         float64        `json:"p90_ms"`
	P99Ms         float64        `json:"p99_ms"`
	MaxMs         float64        `json:"max_ms"`
	CPUSeconds    float64        `json:"cpu_seconds"`
	WallSeconds   float64        `json:"wall_seconds"`
	Connections   int            `json:"connections"`
	GeneratorName string         `json:"generator"`
}

func main() {
	var c config
	flag.StringVar(&c.url, "url", "", "endpoint (https://...)")
	flag.StringVar(&c.bodyFile, "body", "", "file whose bytes are POSTed (JSON)")
	flag.StringVar(&c.ca, "ca", "", "CA bundle (PEM) that signs the server's certificate")
	flag.StringVar(&c.cert, "cert", "", "client certificate (PEM), for mutual TLS")
	flag.StringVar(&c.key, "key", "", "client private key (PEM)")
	flag.StringVar(&c.field, "field", "", "dotted JSON path of the answer field to check (e.g. data.ciphertext)")
	flag.StringVar(&c.prefix, "prefix", "", "the field must start with this")
	flag.StringVar(&c.equals, "equals", "", "the field must equal this")
	flag.Var(&c.headers, "header", "extra request header Name:Value (repeatable)")
	flag.StringVar(&c.headersFile, "headers", "", "file of extra headers, one Name:Value a line (keeps tokens off the command line)")
	flag.IntVar(&c.concurrency, "c", 1, "requests in flight (closed loop)")
	flag.IntVar(&c.dialParallel, "dial-parallel", 32, "connections opened at once while warming up")
	flag.IntVar(&c.status, "status", 200, "the expected HTTP status")
	flag.DurationVar(&c.duration, "t", 3*time.Second, "measured time")
	flag.DurationVar(&c.warmup, "warmup", 500*time.Millisecond, "time before measuring (connections, caches)")
	flag.Parse()
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
}

func client(c config) (*http.Client, error) {
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.ca != "" {
		pem, err := os.ReadFile(c.ca)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no certificate in %s", c.ca)
		}
		tlsConf.RootCAs = pool
	}
	if c.cert != "" {
		pair, err := tls.LoadX509KeyPair(c.cert, c.key)
		if err != nil {
			return nil, err
		}
		tlsConf.Certificates = []tls.Certificate{pair}
	}
	// One transport, so one keep-alive connection, per worker: every connection is opened
	// during the warm-up and none is shared, as in a pool of c clients.
	transport := &http.Transport{
		TLSClientConfig:     tlsConf,
		MaxIdleConns:        1,
		MaxIdleConnsPerHost: 1,
		MaxConnsPerHost:     1,
		IdleConnTimeout:     90 * time.Second,
		// HTTP/1.1 with keep-alive against both sides (the broker speaks only HTTP/1.1; Vault
		// would negotiate h2 and multiplex, which is not what a keep-alive pool measures).
		TLSNextProto:       map[string]func(string, *tls.Conn) http.RoundTripper{},
		DisableCompression: true,
	}
	return &http.Client{Transport: transport, Timeout: 60 * time.Second}, nil
}

func field(body []byte, path string) (string, error) {
	var doc interface{}
	if err := json.Unmarshal(body, &doc); err != nil {
		return "", fmt.Errorf("answer is not JSON")
	}
	for _, part := range strings.Split(path, ".") {
		obj, ok := doc.(map[string]interface{})
		if !ok {
			return "", fmt.Errorf("no field %s", path)
		}
		doc = obj[part]
	}
	s, ok := doc.(string)
	if !ok {
		return "", fmt.Errorf("field %s is not a string", path)
	}
	return s, nil
}

// check returns "" for a good answer, else the kind of error (a key of errors_by_kind).
func check(c config, status int, body []byte) (string, string) {
	if status != c.status {
		return fmt.Sprintf("HTTP %d", status), fmt.Sprintf("HTTP %d: %.200s", status, body)
	}
	if c.field == "" {
		return "", ""
	}
	got, err := field(body, c.field)
	if err != nil {
		return "bad answer", err.Error()
	}
	if c.prefix != "" && !strings.HasPrefix(got, c.prefix) {
		return "bad answer", fmt.Sprintf("%s does not start with %q", c.field, c.prefix)
	}
	if c.equals != "" && got != c.equals {
		return "bad answer", fmt.Sprintf("%s is not the expected value", c.field)
	}
	return "", ""
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func max(a, b int) int {
	if a > b {
		return a
	}
	return b
}

func pct(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)) * p / 100)
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return float64(sorted[i]) / float64(time.Millisecond)
}

func run(c config) error {
	if c.url == "" || c.concurrency < 1 {
		return fmt.Errorf("-url and -c >= 1 are required")
	}
	body, err := os.ReadFile(c.bodyFile)
	if err != nil {
		return err
	}
	if _, err := client(c); err != nil {
		return err
	}
	headers := http.Header{"Content-Type": {"application/json"}}
	lines := append([]string{}, c.headers...)
	if c.headersFile != "" {
		text, err := os.ReadFile(c.headersFile)
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(text), "\n") {
			if strings.TrimSpace(line) != "" {
				lines = append(lines, line)
			}
		}
	}
	for _, h := range lines {
		name, value, ok := strings.Cut(h, ":")
		if !ok {
			return fmt.Errorf("header %q is not Name:Value", h)
		}
		headers.Set(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	// Every connection is opened (TLS handshake included) and has carried one request before
	// the clock starts: the cells measure a keep-alive pool in its steady state, not a burst
	// of handshakes. A worker whose first request fails still joins (its errors count below).
	// Connections are opened at most -dial-parallel at a time, as a client pool ramps up: a
	// burst of hundreds of handshakes from one address meets the broker's per-peer handshake
	// cap, which (rightly) drops the stalled ones.
	var ready, wg sync.WaitGroup
	begin := make(chan struct{})
	dialing := make(chan struct{}, max(1, c.dialParallel))
	var measureFrom, stopAt time.Time
	do := func(httpClient *http.Client) (string, string) {
		req, _ := http.NewRequest(http.MethodPost, c.url, bytes.NewReader(body))
		req.Header = headers.Clone()
		req.ContentLength = int64(len(body))
		resp, err := httpClient.Do(req)
		if err != nil {
			return "transport", err.Error()
		}
		answer, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return "transport", err.Error()
		}
		return check(c, resp.StatusCode, answer)
	}
	workers := make([]*worker, c.concurrency)
	for i := range workers {
		w := &worker{errors: map[string]int{}, latencies: make([]time.Duration, 0, 4096)}
		workers[i] = w
		ready.Add(1)
		wg.Add(1)
		httpClient, _ := client(c)
		go func() {
			defer wg.Done()
			dialing <- struct{}{}
			do(httpClient)
			<-dialing
			ready.Done()
			<-begin
			for {
				began := time.Now()
				if !began.Before(stopAt) {
					return
				}
				kind, detail := do(httpClient)
				ended := time.Now()
				// Completions inside the window count (throughput = completions / window), also
				// those started before it: at high concurrency a request may outlast the warm-up.
				if ended.Before(measureFrom) || ended.After(stopAt) {
					continue
				}
				if kind == "" {
					w.latencies = append(w.latencies, ended.Sub(began))
					continue
				}
				w.errors[kind]++
				if w.firstErr == "" {
					w.firstErr = detail
				}
			}
		}()
	}
	ready.Wait()
	cpu0, wall0 := cpuSeconds(), time.Now()
	measureFrom, stopAt = wall0.Add(c.warmup), wall0.Add(c.warmup+c.duration)
	close(begin)
	wg.Wait()
	out := report{
		Concurrency:   c.concurrency,
		Seconds:       c.duration.Seconds(),
		ErrorsByKind:  map[string]int{},
		CPUSeconds:    cpuSeconds() - cpu0,
		WallSeconds:   time.Since(wall0).Seconds(),
		Connections:   c.concurrency,
		GeneratorName: "go",
	}
	var all []time.Duration
	for _, w := range workers {
		all = append(all, w.latencies...)
		for k, n := range w.errors {
			out.ErrorsByKind[k] += n
			out.Errors += n
		}
		if out.FirstError == "" {
			out.FirstError = w.firstErr
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	out.OK = len(all)
	out.RPS = float64(out.OK) / c.duration.Seconds()
	out.P50Ms, out.P90Ms, out.P99Ms = pct(all, 50), pct(all, 90), pct(all, 99)
	if len(all) > 0 {
		out.MaxMs = float64(all[len(all)-1]) / float64(time.Millisecond)
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}
