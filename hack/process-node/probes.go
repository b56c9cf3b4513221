package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// probe runs the startup probe, then liveness and readiness, against the Pod IP with the
// probes' delays, periods and thresholds.
func (c *containerRun) probe(ctx context.Context, spec *shimSpec) {
	if sp := c.spec.StartupProbe; sp != nil {
		if !c.runProbe(ctx, sp, spec, func(ok bool) bool {
			if ok {
				c.mu.Lock()
				c.started = true
				c.ready = c.spec.ReadinessProbe == nil
				c.mu.Unlock()
				c.pr.changed()
				return false
			}
			return true
		}, func() { c.kill(c.probeGrace(sp)) }) {
			return
		}
	}
	if rp := c.spec.ReadinessProbe; rp != nil {
		go c.runProbe(ctx, rp, spec, func(ok bool) bool {
			c.mu.Lock()
			changed := c.ready != ok
			c.ready = ok
			c.mu.Unlock()
			if changed {
				c.pr.changed()
			}
			return true
		}, nil)
	}
	if lp := c.spec.LivenessProbe; lp != nil {
		go c.runProbe(ctx, lp, spec, func(bool) bool { return true }, func() { c.kill(c.probeGrace(lp)) })
	}
}

func (c *containerRun) probeGrace(p *corev1.Probe) time.Duration {
	if p.TerminationGracePeriodSeconds != nil {
		return time.Duration(*p.TerminationGracePeriodSeconds) * time.Second
	}
	if g := c.pr.pod.Spec.TerminationGracePeriodSeconds; g != nil {
		return time.Duration(*g) * time.Second
	}
	return 30 * time.Second
}

// runProbe calls onResult with each thresholded result until it returns false; onFailure
// runs when the failure threshold is reached (then the probing of this run ends). It returns
// false when the context ended or the probe failed for good.
func (c *containerRun) runProbe(ctx context.Context, p *corev1.Probe, spec *shimSpec, onResult func(bool) bool, onFailure func()) bool {
	period := time.Duration(max(p.PeriodSeconds, 1)) * time.Second
	timeout := time.Duration(max(p.TimeoutSeconds, 1)) * time.Second
	successThreshold := int(max(p.SuccessThreshold, 1))
	failureThreshold := int(max(p.FailureThreshold, 1))
	if !sleepCtx(ctx, time.Duration(p.InitialDelaySeconds)*time.Second) {
		return false
	}
	successes, failures := 0, 0
	for {
		err := c.probeOnce(ctx, p, spec, timeout)
		if ctx.Err() != nil {
			return false
		}
		if err == nil {
			successes, failures = successes+1, 0
			if successes >= successThreshold {
				if !onResult(true) {
					return true
				}
			}
		} else {
			failures, successes = failures+1, 0
			if failures >= failureThreshold {
				c.event(fmt.Sprintf("probe failed: %v", err))
				if onFailure != nil {
					onFailure()
					return false
				}
				onResult(false)
			}
		}
		if !sleepCtx(ctx, period) {
			return false
		}
	}
}

func (c *containerRun) event(msg string) {
	fmt.Fprintf(os.Stderr, "pod %s container %s: %s\n", c.pr.name(), c.spec.Name, msg)
}

func (c *containerRun) port(p intstr.IntOrString) (int, error) {
	if p.Type == intstr.Int {
		return p.IntValue(), nil
	}
	for _, cp := range c.spec.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	return 0, fmt.Errorf("no container port named %q", p.StrVal)
}

func (c *containerRun) probeOnce(ctx context.Context, p *corev1.Probe, spec *shimSpec, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch {
	case p.HTTPGet != nil:
		port, err := c.port(p.HTTPGet.Port)
		if err != nil {
			return err
		}
		host := p.HTTPGet.Host
		if host == "" {
			host = c.pr.ip
		}
		scheme := "http"
		if p.HTTPGet.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		path := p.HTTPGet.Path
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+net.JoinHostPort(host, strconv.Itoa(port))+path, nil)
		if err != nil {
			return err
		}
		req.Header.Set("User-Agent", "kube-probe/1.37")
		for _, h := range p.HTTPGet.HTTPHeaders {
			req.Header.Set(h.Name, h.Value)
		}
		client := &http.Client{
			Transport:     &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 10<<10))
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("HTTP probe failed with statuscode: %d", resp.StatusCode)
		}
		return nil
	case p.TCPSocket != nil:
		port, err := c.port(p.TCPSocket.Port)
		if err != nil {
			return err
		}
		host := p.TCPSocket.Host
		if host == "" {
			host = c.pr.ip
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	case p.Exec != nil:
		return c.execProbe(ctx, p.Exec.Command, spec)
	case p.GRPC != nil:
		return fmt.Errorf("grpc probes are not supported by process-node")
	}
	return fmt.Errorf("probe has no handler")
}

// execProbe runs the command with the container's mounts, user and environment.
func (c *containerRun) execProbe(ctx context.Context, command []string, base *shimSpec) error {
	if len(command) == 0 {
		return fmt.Errorf("exec probe has no command")
	}
	spec := *base
	spec.Argv = expandAll(command, envMap(base.Env))
	f, err := os.CreateTemp(c.dir, "probe-*.json")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := writeJSON(f, &spec); err != nil {
		return err
	}
	var out bytes.Buffer
	cmd, errR, err := shimCommandFor(c.pr.prov.sh.self, f.Name(), &out, &out)
	if err != nil {
		return err
	}
	if msg := readAll(errR); msg != "" {
		_ = cmd.Wait()
		return fmt.Errorf("exec probe: %s", msg)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("command %v failed: %v: %s", spec.Argv, err, strings.TrimSpace(out.String()))
		}
		return nil
	case <-ctx.Done():
		_ = killGroup(cmd.Process.Pid)
		<-done
		return fmt.Errorf("command %v timed out", spec.Argv)
	}
}
