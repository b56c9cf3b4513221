package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// podRun is one Pod on this Node: its directory, volumes and container runners.
type podRun struct {
	prov      *Provider
	mu        sync.Mutex
	pod       *corev1.Pod
	ip        string
	dir       string
	ctx       context.Context
	cancel    context.CancelFunc
	grace     time.Duration
	done      chan struct{}
	started   metav1.Time
	volumesOK bool
	initDone  bool
	terminal  corev1.PodPhase
	init      []*containerRun
	ctrs      []*containerRun
	volumes   *volumeSet
}

func newPodRun(p *Provider, pod *corev1.Pod, ip string) *podRun {
	ctx, cancel := context.WithCancel(context.Background())
	pr := &podRun{
		prov:    p,
		pod:     pod,
		ip:      ip,
		dir:     filepath.Join(p.sh.opts.workDir, "pods", string(pod.UID)),
		ctx:     ctx,
		cancel:  cancel,
		done:    make(chan struct{}),
		started: metav1.Now(),
	}
	for i := range pod.Spec.InitContainers {
		pr.init = append(pr.init, newContainerRun(pr, pod.Spec.InitContainers[i], true))
	}
	for i := range pod.Spec.Containers {
		pr.ctrs = append(pr.ctrs, newContainerRun(pr, pod.Spec.Containers[i], false))
	}
	pr.volumes = newVolumeSet(pr)
	return pr
}

func (pr *podRun) name() string {
	return fmt.Sprintf("%s_%s(%s)", pr.pod.Name, pr.pod.Namespace, pr.pod.UID)
}

func (pr *podRun) updateSpec(pod *corev1.Pod) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	status := pr.pod.Status
	pr.pod = pod.DeepCopy()
	pr.pod.Status = status
}

func (pr *podRun) spec() *corev1.Pod {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.pod.DeepCopy()
}

func (pr *podRun) changed() { pr.prov.notifyFn()(pr.snapshot()) }

// terminate asks every container to stop; a second call does not shorten nor extend the grace.
func (pr *podRun) terminate(grace time.Duration) {
	pr.mu.Lock()
	if pr.ctx.Err() == nil {
		pr.grace = grace
	}
	pr.mu.Unlock()
	pr.cancel()
}

func (pr *podRun) terminationGrace() time.Duration {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.grace
}

func (pr *podRun) run() {
	defer close(pr.done)
	if err := os.MkdirAll(pr.dir, 0o755); err != nil {
		log.Printf("pod %s: %v", pr.name(), err)
	}
	pr.changed()
	// Volumes first, retried like a kubelet's mount step until they can be set up.
	for {
		err := pr.volumes.sync(pr.ctx)
		if err == nil {
			break
		}
		for _, c := range append(append([]*containerRun{}, pr.init...), pr.ctrs...) {
			c.setWaiting("ContainerCreating", "MountVolume.SetUp failed: "+err.Error())
		}
		pr.changed()
		if !sleepCtx(pr.ctx, 2*time.Second) {
			pr.finishUnstarted()
			return
		}
	}
	pr.mu.Lock()
	pr.volumesOK = true
	pr.mu.Unlock()
	go pr.resyncVolumes()

	for _, c := range pr.init {
		for {
			code, ok := c.runOnce()
			if pr.ctx.Err() != nil {
				pr.finishUnstarted()
				return
			}
			if ok && code == 0 {
				break
			}
			if pr.pod.Spec.RestartPolicy == corev1.RestartPolicyNever {
				pr.setTerminal(corev1.PodFailed)
				pr.finishUnstarted()
				return
			}
			if !c.backOff() {
				pr.finishUnstarted()
				return
			}
		}
	}
	pr.mu.Lock()
	pr.initDone = true
	pr.mu.Unlock()
	pr.changed()

	var wg sync.WaitGroup
	for _, c := range pr.ctrs {
		wg.Add(1)
		go func() { defer wg.Done(); c.loop() }()
	}
	wg.Wait()
	pr.changed()
}

// finishUnstarted marks containers that never ran as terminated, so the Pod's status is final.
func (pr *podRun) finishUnstarted() {
	for _, c := range append(append([]*containerRun{}, pr.init...), pr.ctrs...) {
		c.terminateIfWaiting()
	}
	pr.changed()
}

func (pr *podRun) setTerminal(phase corev1.PodPhase) {
	pr.mu.Lock()
	pr.terminal = phase
	pr.mu.Unlock()
}

func (pr *podRun) resyncVolumes() {
	t := time.NewTicker(pr.prov.sh.opts.volumeResync)
	defer t.Stop()
	for {
		select {
		case <-pr.ctx.Done():
			return
		case <-t.C:
			if err := pr.volumes.sync(pr.ctx); err != nil && pr.ctx.Err() == nil {
				log.Printf("pod %s: volume resync: %v", pr.name(), err)
			}
		}
	}
}

func (pr *podRun) cleanup() {
	if err := os.RemoveAll(pr.dir); err != nil {
		log.Printf("pod %s: remove %s: %v", pr.name(), pr.dir, err)
	}
}

// snapshot is the Pod with the status a kubelet would report now.
func (pr *podRun) snapshot() *corev1.Pod {
	pr.mu.Lock()
	pod := pr.pod.DeepCopy()
	volumesOK, initDone, terminal := pr.volumesOK, pr.initDone, pr.terminal
	pr.mu.Unlock()

	st := &pod.Status
	st.HostIP = "127.0.0.1"
	st.HostIPs = []corev1.HostIP{{IP: "127.0.0.1"}}
	st.PodIP = pr.ip
	st.PodIPs = []corev1.PodIP{{IP: pr.ip}}
	st.StartTime = &pr.started
	st.InitContainerStatuses = nil
	for _, c := range pr.init {
		st.InitContainerStatuses = append(st.InitContainerStatuses, c.status())
	}
	st.ContainerStatuses = nil
	for _, c := range pr.ctrs {
		st.ContainerStatuses = append(st.ContainerStatuses, c.status())
	}

	allReady, running, succeeded, failed, everStarted := true, 0, 0, 0, false
	for _, cs := range st.ContainerStatuses {
		if !cs.Ready {
			allReady = false
		}
		switch {
		case cs.State.Running != nil:
			running++
			everStarted = true
		case cs.State.Terminated != nil:
			everStarted = true
			if cs.State.Terminated.ExitCode == 0 {
				succeeded++
			} else {
				failed++
			}
		}
		if cs.RestartCount > 0 {
			everStarted = true
		}
	}
	n := len(st.ContainerStatuses)
	phase := corev1.PodPending
	switch {
	case terminal != "":
		phase = terminal
	case succeeded+failed == n && n > 0 && failed == 0 && pod.Spec.RestartPolicy != corev1.RestartPolicyAlways:
		phase = corev1.PodSucceeded
	case succeeded+failed == n && n > 0 && pod.Spec.RestartPolicy == corev1.RestartPolicyNever:
		phase = corev1.PodFailed
	case succeeded+failed == n && n > 0 && pr.ctx.Err() != nil:
		// stopped for deletion: final like a kubelet's terminal phase
		if failed == 0 {
			phase = corev1.PodSucceeded
		} else {
			phase = corev1.PodFailed
		}
	case everStarted:
		phase = corev1.PodRunning
	}
	st.Phase = phase
	if phase == corev1.PodSucceeded || phase == corev1.PodFailed {
		allReady = false
	}
	_ = running

	setCond := func(t corev1.PodConditionType, ok bool, reason string) {
		status := corev1.ConditionFalse
		if ok {
			status, reason = corev1.ConditionTrue, ""
		}
		for i := range st.Conditions {
			if st.Conditions[i].Type == t {
				if st.Conditions[i].Status != status {
					st.Conditions[i].LastTransitionTime = metav1.Now()
				}
				st.Conditions[i].Status, st.Conditions[i].Reason = status, reason
				return
			}
		}
		st.Conditions = append(st.Conditions, corev1.PodCondition{Type: t, Status: status, Reason: reason, LastTransitionTime: metav1.Now()})
	}
	setCond(corev1.PodReadyToStartContainers, volumesOK, "")
	initReason := "ContainersNotInitialized"
	setCond(corev1.PodInitialized, initDone || len(pr.init) == 0 && volumesOK, initReason)
	notReady := "ContainersNotReady"
	if phase == corev1.PodSucceeded || phase == corev1.PodFailed {
		notReady = "PodCompleted"
	}
	setCond(corev1.ContainersReady, allReady && n > 0, notReady)
	setCond(corev1.PodReady, allReady && n > 0, notReady)
	// Keep the conditions so their transition times only move when their status does.
	pr.mu.Lock()
	pr.pod.Status.Conditions = append([]corev1.PodCondition(nil), st.Conditions...)
	pr.mu.Unlock()
	return pod
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
