package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	statsv1alpha1 "k8s.io/kubelet/pkg/apis/stats/v1alpha1"
)

// shared is what every Node of this agent uses together: one address pool, one token cache.
type shared struct {
	opts   options
	client kubernetes.Interface
	self   string
	caData []byte
	ips    *ipPool
	tokens *tokenCache
}

// Provider runs the Pods bound to one Node.
type Provider struct {
	node   string
	sh     *shared
	mu     sync.Mutex
	pods   map[string]*podRun
	notify func(*corev1.Pod)
}

func newProviderFor(node string, sh *shared) *Provider {
	return &Provider{node: node, sh: sh, pods: map[string]*podRun{}, notify: func(*corev1.Pod) {}}
}

func podKey(ns, name string) string { return ns + "/" + name }

// CreatePod starts the Pod's containers in the background; progress is reported via NotifyPods.
func (p *Provider) CreatePod(ctx context.Context, pod *corev1.Pod) error {
	key := podKey(pod.Namespace, pod.Name)
	p.mu.Lock()
	if old, ok := p.pods[key]; ok && old.pod.UID == pod.UID {
		p.mu.Unlock()
		return nil
	}
	ip, err := p.sh.ips.allocate(string(pod.UID), pod.Status.PodIP)
	if err != nil {
		p.mu.Unlock()
		return err
	}
	pr := newPodRun(p, pod.DeepCopy(), ip)
	p.pods[key] = pr
	p.mu.Unlock()
	log.Printf("%s: pod %s created (ip %s)", p.node, key, ip)
	go pr.run()
	return nil
}

// UpdatePod keeps the newest spec (labels and annotations feed the downward API).
func (p *Provider) UpdatePod(ctx context.Context, pod *corev1.Pod) error {
	pr := p.get(pod.Namespace, pod.Name)
	if pr == nil {
		return errdefs.NotFoundf("pod %s/%s is not known to %s", pod.Namespace, pod.Name, p.node)
	}
	pr.updateSpec(pod)
	return nil
}

// DeletePod stops the Pod's processes (SIGTERM, grace period, SIGKILL) and returns only when
// they are gone, so the Pod object is removed after its processes and not before.
func (p *Provider) DeletePod(ctx context.Context, pod *corev1.Pod) error {
	pr := p.get(pod.Namespace, pod.Name)
	if pr == nil || pr.pod.UID != pod.UID {
		return errdefs.NotFoundf("pod %s/%s is not known to %s", pod.Namespace, pod.Name, p.node)
	}
	grace := int64(30)
	if pod.Spec.TerminationGracePeriodSeconds != nil {
		grace = *pod.Spec.TerminationGracePeriodSeconds
	}
	if pod.DeletionGracePeriodSeconds != nil {
		grace = *pod.DeletionGracePeriodSeconds
	}
	pr.terminate(time.Duration(grace) * time.Second)
	select {
	case <-pr.done:
	case <-time.After(time.Duration(grace)*time.Second + 20*time.Second):
		return fmt.Errorf("pod %s/%s: processes still running %ds after SIGTERM", pod.Namespace, pod.Name, grace+20)
	}
	p.mu.Lock()
	if cur, ok := p.pods[podKey(pod.Namespace, pod.Name)]; ok && cur == pr {
		delete(p.pods, podKey(pod.Namespace, pod.Name))
	}
	p.mu.Unlock()
	p.sh.ips.release(string(pod.UID))
	final := pr.snapshot()
	now := metav1.Now()
	final.DeletionTimestamp = &now
	p.notify(final)
	pr.cleanup()
	log.Printf("%s: pod %s/%s deleted", p.node, pod.Namespace, pod.Name)
	return nil
}

func (p *Provider) get(ns, name string) *podRun {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pods[podKey(ns, name)]
}

// GetPod returns the Pod as this agent runs it, status included.
func (p *Provider) GetPod(ctx context.Context, ns, name string) (*corev1.Pod, error) {
	pr := p.get(ns, name)
	if pr == nil {
		return nil, errdefs.NotFoundf("pod %s/%s is not known to %s", ns, name, p.node)
	}
	return pr.snapshot(), nil
}

// GetPodStatus returns the Pod's current status.
func (p *Provider) GetPodStatus(ctx context.Context, ns, name string) (*corev1.PodStatus, error) {
	pod, err := p.GetPod(ctx, ns, name)
	if err != nil {
		return nil, err
	}
	return &pod.Status, nil
}

// GetPods lists the Pods this Node runs.
func (p *Provider) GetPods(ctx context.Context) ([]*corev1.Pod, error) {
	p.mu.Lock()
	runs := make([]*podRun, 0, len(p.pods))
	for _, pr := range p.pods {
		runs = append(runs, pr)
	}
	p.mu.Unlock()
	out := make([]*corev1.Pod, 0, len(runs))
	for _, pr := range runs {
		out = append(out, pr.snapshot())
	}
	return out, nil
}

// NotifyPods registers virtual-kubelet's status callback.
func (p *Provider) NotifyPods(ctx context.Context, f func(*corev1.Pod)) {
	p.mu.Lock()
	p.notify = f
	p.mu.Unlock()
}

func (p *Provider) notifyFn() func(*corev1.Pod) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.notify
}

// GetContainerLogs serves `kubectl logs` from the container's log files.
func (p *Provider) GetContainerLogs(ctx context.Context, ns, name, container string, opts api.ContainerLogOpts) (io.ReadCloser, error) {
	pr := p.get(ns, name)
	if pr == nil {
		return nil, errdefs.NotFoundf("pod %s/%s is not known to %s", ns, name, p.node)
	}
	return pr.logs(ctx, container, opts)
}

// RunInContainer is not offered: a container is a process, run commands on the host instead.
func (p *Provider) RunInContainer(ctx context.Context, ns, name, container string, cmd []string, attach api.AttachIO) error {
	return errdefs.InvalidInput("exec is not supported by process-node; the container is a local process")
}

// AttachToContainer is not offered (see RunInContainer).
func (p *Provider) AttachToContainer(ctx context.Context, ns, name, container string, attach api.AttachIO) error {
	return errdefs.InvalidInput("attach is not supported by process-node; read the log file instead")
}

// GetStatsSummary reports no usage figures.
func (p *Provider) GetStatsSummary(ctx context.Context) (*statsv1alpha1.Summary, error) {
	return &statsv1alpha1.Summary{Node: statsv1alpha1.NodeStats{NodeName: p.node}}, nil
}

// GetMetricsResource reports no usage figures.
func (p *Provider) GetMetricsResource(ctx context.Context) ([]*dto.MetricFamily, error) {
	return nil, nil
}

// PortForward is unnecessary: a Pod IP is reachable from the host directly.
func (p *Provider) PortForward(ctx context.Context, ns, name string, port int32, stream io.ReadWriteCloser) error {
	return errdefs.InvalidInput("port-forward is not supported by process-node; connect to the Pod IP directly")
}

// shutdown stops every Pod's processes when the agent itself stops.
func (p *Provider) shutdown(ctx context.Context) {
	p.mu.Lock()
	runs := make([]*podRun, 0, len(p.pods))
	for _, pr := range p.pods {
		runs = append(runs, pr)
	}
	p.mu.Unlock()
	for _, pr := range runs {
		pr.terminate(5 * time.Second)
	}
	for _, pr := range runs {
		select {
		case <-pr.done:
		case <-ctx.Done():
			return
		}
	}
}

// ipPool hands out one loopback address per Pod: 127.0.0.2, 127.0.0.3, ...
type ipPool struct {
	mu    sync.Mutex
	byUID map[string]string
	used  map[string]bool
}

func newIPPool() *ipPool { return &ipPool{byUID: map[string]string{}, used: map[string]bool{}} }

func (p *ipPool) allocate(uid, previous string) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ip, ok := p.byUID[uid]; ok {
		return ip, nil
	}
	// A Pod that already had an address (agent restart) keeps it when it is still free.
	if previous != "" && !p.used[previous] {
		p.byUID[uid], p.used[previous] = previous, true
		return previous, nil
	}
	for i := 2; i < 255*255; i++ {
		ip := fmt.Sprintf("127.0.%d.%d", i/255, i%255)
		if i%255 == 0 || p.used[ip] {
			continue
		}
		p.byUID[uid], p.used[ip] = ip, true
		return ip, nil
	}
	return "", fmt.Errorf("no free loopback Pod IP")
}

func (p *ipPool) release(uid string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ip, ok := p.byUID[uid]; ok {
		delete(p.used, ip)
		delete(p.byUID, uid)
	}
}

// killLeftovers ends processes a previous agent run left behind (it crashed or was killed):
// their Pods are started afresh, so the old processes must not keep ports and files.
func killLeftovers(podsDir string) {
	files, _ := filepath.Glob(filepath.Join(podsDir, "*", "*", "pid"))
	sort.Strings(files)
	for _, f := range files {
		pid, start, ok := readPidFile(f)
		if ok && processStart(pid) == start {
			log.Printf("killing leftover process group %d (%s)", pid, f)
			_ = killGroup(pid)
		}
	}
	entries, _ := os.ReadDir(podsDir)
	for _, e := range entries {
		_ = os.RemoveAll(filepath.Join(podsDir, e.Name()))
	}
}
