package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// containerRun supervises one container: starts its process, restarts it per restartPolicy
// with a growing back-off, and runs its probes.
type containerRun struct {
	pr       *podRun
	spec     corev1.Container
	isInit   bool
	dir      string
	mu       sync.Mutex
	state    corev1.ContainerState
	last     corev1.ContainerState
	restarts int32
	ready    bool
	started  bool
	pid      int
	proc     *exec.Cmd
	exited   chan struct{}
	crashes  int
	image    string
}

func newContainerRun(pr *podRun, c corev1.Container, isInit bool) *containerRun {
	cr := &containerRun{pr: pr, spec: c, isInit: isInit, dir: filepath.Join(pr.dir, c.Name)}
	cr.state.Waiting = &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}
	if isInit {
		cr.state.Waiting.Reason = "PodInitializing"
	}
	return cr
}

func (c *containerRun) status() corev1.ContainerStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	started := c.started && c.state.Running != nil
	cs := corev1.ContainerStatus{
		Name:                 c.spec.Name,
		Image:                c.spec.Image,
		ImageID:              c.image,
		State:                *c.state.DeepCopy(),
		LastTerminationState: *c.last.DeepCopy(),
		RestartCount:         c.restarts,
		Ready:                c.ready && c.state.Running != nil,
		Started:              &started,
	}
	if c.pid > 0 {
		cs.ContainerID = fmt.Sprintf("process://%d", c.pid)
	}
	return cs
}

func (c *containerRun) setWaiting(reason, msg string) {
	c.mu.Lock()
	c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: msg}}
	c.ready = false
	c.mu.Unlock()
}

func (c *containerRun) terminateIfWaiting() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state.Waiting != nil {
		now := metav1.Now()
		reason := "ContainerStatusUnknown"
		if c.restarts > 0 || c.last.Terminated != nil {
			reason = "Error"
		}
		c.state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
			ExitCode: 137, Reason: reason, Message: "stopped before it started", StartedAt: now, FinishedAt: now,
		}}
		if c.last.Terminated != nil {
			c.state.Terminated = c.last.Terminated.DeepCopy()
		}
	}
}

// loop runs a regular container until the Pod is deleted or the restart policy lets it rest.
func (c *containerRun) loop() {
	policy := c.pr.pod.Spec.RestartPolicy
	for {
		code, ran := c.runOnce()
		if c.pr.ctx.Err() != nil {
			c.terminateIfWaiting()
			return
		}
		if ran && (policy == corev1.RestartPolicyNever || policy == corev1.RestartPolicyOnFailure && code == 0) {
			return
		}
		if !ran && policy == corev1.RestartPolicyNever && c.startFailedFinal() {
			return
		}
		if !c.backOff() {
			c.terminateIfWaiting()
			return
		}
	}
}

// startFailedFinal reports whether a start failure is final (an exec error, not a missing
// image or config, which a kubelet keeps retrying).
func (c *containerRun) startFailedFinal() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state.Terminated != nil
}

// backOff waits before the next start: the first restart is immediate, then 10s, 20s, ...
// capped, with the waiting reason CrashLoopBackOff; false when the Pod is deleted meanwhile.
func (c *containerRun) backOff() bool {
	c.mu.Lock()
	waitingBeforeStart := c.state.Waiting != nil
	if c.state.Terminated != nil {
		c.last = corev1.ContainerState{Terminated: c.state.Terminated.DeepCopy()}
		c.restarts++
		// a container that ran 10 minutes without crashing starts its back-off afresh
		if time.Since(c.state.Terminated.StartedAt.Time) > 10*time.Minute {
			c.crashes = 0
		}
		c.crashes++
	}
	crashes := c.crashes
	c.mu.Unlock()
	opts := c.pr.prov.sh.opts
	if waitingBeforeStart {
		// image, config or policy problem: retry like a kubelet's sync loop, reason kept
		c.pr.changed()
		return sleepCtx(c.pr.ctx, 5*time.Second)
	}
	if crashes <= 1 {
		c.pr.changed()
		return c.pr.ctx.Err() == nil
	}
	delay := opts.initialBack
	for i := 2; i < crashes && delay < opts.maxBack; i++ {
		delay *= 2
	}
	if delay > opts.maxBack {
		delay = opts.maxBack
	}
	c.setWaiting("CrashLoopBackOff", fmt.Sprintf("back-off %s restarting failed container=%s pod=%s", delay, c.spec.Name, c.pr.name()))
	c.pr.changed()
	return sleepCtx(c.pr.ctx, delay)
}

// runOnce starts the process and waits for it; ran is false when it could not be started.
func (c *containerRun) runOnce() (code int32, ran bool) {
	pod := c.pr.spec()
	spec, err := c.prepare(pod)
	if err != nil {
		var ce *configError
		if errors.As(err, &ce) {
			c.setWaiting(ce.reason, ce.msg)
		} else {
			c.setWaiting("CreateContainerError", err.Error())
		}
		c.pr.changed()
		return 0, false
	}
	cmd, pid, err := c.start(spec)
	if err != nil {
		now := metav1.Now()
		c.mu.Lock()
		c.state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
			ExitCode: 128, Reason: "StartError", Message: err.Error(), StartedAt: now, FinishedAt: now,
		}}
		c.mu.Unlock()
		c.pr.changed()
		return 128, true
	}
	startedAt := metav1.Now()
	exited := make(chan struct{})
	c.mu.Lock()
	c.pid, c.proc, c.exited = pid, cmd, exited
	c.state = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: startedAt}}
	c.started = c.spec.StartupProbe == nil
	c.ready = c.spec.ReadinessProbe == nil && c.started
	c.mu.Unlock()
	c.pr.changed()

	probeCtx, stopProbes := context.WithCancel(c.pr.ctx)
	if !c.isInit {
		go c.probe(probeCtx, spec)
	}
	waitErr := make(chan error, 1)
	go func() { waitErr <- cmd.Wait(); close(exited) }()
	var werr error
	select {
	case werr = <-waitErr:
	case <-c.pr.ctx.Done():
		werr = c.stop(c.pr.terminationGrace(), waitErr)
	}
	stopProbes()
	// the process group may hold children of the main process: none outlives the container
	_ = killGroup(pid)
	code = exitCode(cmd, werr)
	reason := "Completed"
	if code != 0 {
		reason = "Error"
	}
	// read before taking c.mu: the log fallback looks up the current log under c.mu
	message := c.terminationMessage(code)
	c.mu.Lock()
	c.state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
		ExitCode: code, Reason: reason, StartedAt: startedAt, FinishedAt: metav1.Now(),
		Message:     message,
		ContainerID: fmt.Sprintf("process://%d", pid),
	}}
	c.ready, c.started = false, false
	c.mu.Unlock()
	_ = os.Remove(filepath.Join(c.dir, "pid"))
	log.Printf("pod %s container %s: pid %d exited with %d", c.pr.name(), c.spec.Name, pid, code)
	c.pr.changed()
	return code, true
}

// stop sends SIGTERM, waits the grace period, then SIGKILLs the whole process group.
func (c *containerRun) stop(grace time.Duration, waitErr chan error) error {
	c.mu.Lock()
	pid := c.pid
	c.mu.Unlock()
	if c.spec.Lifecycle != nil && c.spec.Lifecycle.PreStop != nil && c.spec.Lifecycle.PreStop.Sleep != nil {
		time.Sleep(time.Duration(c.spec.Lifecycle.PreStop.Sleep.Seconds) * time.Second)
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	select {
	case err := <-waitErr:
		return err
	case <-time.After(grace):
	}
	_ = killGroup(pid)
	return <-waitErr
}

// kill ends the current process (failed liveness or startup probe); the loop restarts it.
func (c *containerRun) kill(grace time.Duration) {
	c.mu.Lock()
	pid, exited := c.pid, c.exited
	c.mu.Unlock()
	_ = syscall.Kill(pid, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(grace):
		_ = killGroup(pid)
	}
}

func killGroup(pid int) error {
	if pid <= 0 {
		return nil
	}
	return syscall.Kill(-pid, syscall.SIGKILL)
}

func exitCode(cmd *exec.Cmd, err error) int32 {
	if cmd.ProcessState == nil {
		return 128
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int32(ws.Signal())
	}
	return int32(cmd.ProcessState.ExitCode())
}

// terminationMessage reads terminationMessagePath (or the log tail with FallbackToLogsOnError).
func (c *containerRun) terminationMessage(code int32) string {
	b, _ := os.ReadFile(filepath.Join(c.dir, "termination-log"))
	if len(b) > 4096 {
		b = b[:4096]
	}
	msg := string(b)
	if msg == "" && code != 0 && c.spec.TerminationMessagePolicy == corev1.TerminationMessageFallbackToLogsOnError {
		msg = tailLines(c.currentLog(), 80, 2048)
	}
	return msg
}

func (c *containerRun) logPath(restart int32) string {
	return filepath.Join(c.dir, fmt.Sprintf("%d.log", restart))
}

func (c *containerRun) currentLog() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.logPath(c.restarts)
}

// configError is a problem a kubelet reports as the container's waiting reason.
type configError struct{ reason, msg string }

func (e *configError) Error() string { return e.reason + ": " + e.msg }

// prepare resolves image, environment, user and mounts into the shim's instructions.
func (c *containerRun) prepare(pod *corev1.Pod) (*shimSpec, error) {
	sh := c.pr.prov.sh
	exe, err := resolveImage(sh.opts.imagesFile, c.spec.Image)
	if err != nil {
		return nil, &configError{"ErrImagePull", err.Error()}
	}
	c.mu.Lock()
	c.image = "process://" + exe
	c.mu.Unlock()
	uid, gid, groups, err := c.identity(pod)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(c.dir, "bin"), 0o755); err != nil {
		return nil, fmt.Errorf("create container dir: %w", err)
	}
	binTarget := filepath.Join(c.dir, "bin", filepath.Base(exe))
	if err := touch(binTarget, 0o755); err != nil {
		return nil, err
	}
	env, err := c.pr.environment(context.Background(), pod, &c.spec, filepath.Join(c.dir, "bin"), uid)
	if err != nil {
		return nil, &configError{"CreateContainerConfigError", err.Error()}
	}
	lookup := envMap(env)
	var argv []string
	if len(c.spec.Command) > 0 {
		argv = append(argv, expandAll(c.spec.Command, lookup)...)
		// the image's executable under its own name (e.g. /usr/local/bin/inventory-outbox)
		if filepath.Base(argv[0]) == filepath.Base(exe) {
			argv[0] = binTarget
		}
	} else {
		argv = []string{binTarget}
	}
	argv = append(argv, expandAll(c.spec.Args, lookup)...)

	termPath := c.spec.TerminationMessagePath
	if termPath == "" {
		termPath = "/dev/termination-log"
	}
	termFile := filepath.Join(c.dir, "termination-log")
	if err := os.WriteFile(termFile, nil, 0o666); err != nil {
		return nil, fmt.Errorf("create termination message file: %w", err)
	}
	_ = os.Chmod(termFile, 0o666)
	mounts := []shimMount{
		{Source: exe, Target: binTarget, ReadOnly: true},
		{Source: termFile, Target: termPath},
	}
	vm, err := c.pr.volumes.mountsFor(&c.spec)
	if err != nil {
		return nil, &configError{"CreateContainerConfigError", err.Error()}
	}
	mounts = append(mounts, vm...)
	spec := &shimSpec{
		Argv: argv, Env: env, Mounts: mounts, WorkingDir: c.spec.WorkingDir,
		UID: uid, GID: gid, Groups: groups,
	}
	if sc := c.spec.SecurityContext; sc != nil && sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem {
		spec.ReadOnlyRoot = true
	}
	return spec, nil
}

// identity applies runAsUser/runAsGroup/runAsNonRoot (container over Pod level). The mapped
// executable has no image user: without runAsUser it runs as root, like an image without USER.
func (c *containerRun) identity(pod *corev1.Pod) (uid, gid uint32, groups []uint32, err error) {
	var runAsUser, runAsGroup *int64
	var nonRoot *bool
	if psc := pod.Spec.SecurityContext; psc != nil {
		runAsUser, runAsGroup, nonRoot = psc.RunAsUser, psc.RunAsGroup, psc.RunAsNonRoot
		for _, g := range psc.SupplementalGroups {
			groups = append(groups, uint32(g))
		}
		if psc.FSGroup != nil {
			groups = append(groups, uint32(*psc.FSGroup))
		}
	}
	if sc := c.spec.SecurityContext; sc != nil {
		if sc.RunAsUser != nil {
			runAsUser = sc.RunAsUser
		}
		if sc.RunAsGroup != nil {
			runAsGroup = sc.RunAsGroup
		}
		if sc.RunAsNonRoot != nil {
			nonRoot = sc.RunAsNonRoot
		}
	}
	podRef := fmt.Sprintf("pod: %q, container: %s", c.pr.name(), c.spec.Name)
	if nonRoot != nil && *nonRoot {
		if runAsUser == nil {
			return 0, 0, nil, &configError{"CreateContainerConfigError", "container has runAsNonRoot and image will run as root (" + podRef + ")"}
		}
		if *runAsUser == 0 {
			return 0, 0, nil, &configError{"CreateContainerConfigError", "container's runAsUser breaks non-root policy (" + podRef + ")"}
		}
	}
	if runAsUser != nil {
		uid = uint32(*runAsUser)
		gid = uid
	}
	if runAsGroup != nil {
		gid = uint32(*runAsGroup)
	}
	return uid, gid, groups, nil
}

// start launches the shim in a new mount namespace and its own process group; the shim
// reports setup errors through a pipe that closes when the container's exec succeeds.
func (c *containerRun) start(spec *shimSpec) (*exec.Cmd, int, error) {
	c.mu.Lock()
	logFile := c.logPath(c.restarts)
	c.mu.Unlock()
	specPath := filepath.Join(c.dir, "spec.json")
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, 0, fmt.Errorf("encode container spec: %w", err)
	}
	if err := os.WriteFile(specPath, b, 0o600); err != nil {
		return nil, 0, fmt.Errorf("write container spec: %w", err)
	}
	out, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, 0, fmt.Errorf("open log file: %w", err)
	}
	defer out.Close()
	cmd, errR, err := shimCommandFor(c.pr.prov.sh.self, specPath, out, out)
	if err != nil {
		return nil, 0, err
	}
	pid := cmd.Process.Pid
	msg := readAll(errR)
	if msg != "" {
		_ = cmd.Wait()
		return nil, 0, errors.New(msg)
	}
	_ = os.WriteFile(filepath.Join(c.dir, "pid"), []byte(strconv.Itoa(pid)+" "+strconv.FormatUint(processStart(pid), 10)), 0o600)
	log.Printf("pod %s container %s: started pid %d: %s", c.pr.name(), c.spec.Name, pid, strings.Join(spec.Argv, " "))
	return cmd, pid, nil
}

func touch(path string, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, mode)
	if err != nil {
		return fmt.Errorf("create mount point %s: %w", path, err)
	}
	return f.Close()
}

func readPidFile(path string) (int, uint64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, false
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0, 0, false
	}
	pid, err1 := strconv.Atoi(f[0])
	st, err2 := strconv.ParseUint(f[1], 10, 64)
	return pid, st, err1 == nil && err2 == nil
}

// processStart is the process's start time in clock ticks (guards against reused pids).
func processStart(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0
	}
	v, _ := strconv.ParseUint(f[19], 10, 64)
	return v
}
