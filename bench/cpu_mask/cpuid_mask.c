/* Make a process see a smaller x86 CPU: cpuid answers without AVX-512/VNNI/AMX bits.
 *
 * Loaded with LD_PRELOAD (see bench/cpu_mask/__init__.py). It turns on Linux's cpuid
 * faulting (arch_prctl ARCH_SET_CPUID 0; the kernel and CPU must support it: the
 * `cpuid_fault` flag in /proc/cpuinfo), so every later cpuid instruction raises SIGSEGV; the
 * handler runs the real cpuid with faulting briefly off, clears the masked feature bits and
 * resumes after the instruction. onnxruntime's MLAS picks its kernels from cpuid at load, so
 * it then runs the kernels of the smaller class (AVX2 without VNNI: vpmaddubsw, saturating).
 *
 * ONNXQ_CPUID_MASK=avx2         no AVX-512, no VNNI (AVX-512 or AVX), no AMX
 * ONNXQ_CPUID_MASK=avx512-vnni  no AMX
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_SET_CPUID
#define ARCH_SET_CPUID 0x1012
#endif

static int mask_avx512, mask_vnni, mask_amx;

static long set_cpuid_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void on_segv(int sig, siginfo_t *info, void *raw) {
    (void)info;
    ucontext_t *context = raw;
    greg_t *regs = context->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: let it crash as it would have */
        signal(sig, SIG_DFL);
        return;
    }
    unsigned int leaf = (unsigned int)regs[REG_RAX], sub = (unsigned int)regs[REG_RCX];
    unsigned int a, b, c, d;
    set_cpuid_faulting(0);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_cpuid_faulting(1);
    if (leaf == 7 && sub == 0) {
        if (mask_avx512) {
            b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) |
                   (1u << 31));
            c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
            d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 23));
        }
        if (mask_vnni) c &= ~(1u << 11);
        if (mask_amx) d &= ~((1u << 22) | (1u << 24) | (1u << 25));
    }
    if (leaf == 7 && sub == 1) {
        if (mask_vnni) { a &= ~((1u << 4) | (1u << 5)); d &= ~(1u << 4); }
        if (mask_avx512) a &= ~(1u << 5);
    }
    regs[REG_RAX] = a;
    regs[REG_RBX] = b;
    regs[REG_RCX] = c;
    regs[REG_RDX] = d;
    regs[REG_RIP] += 2;
}

__attribute__((constructor)) static void install(void) {
    const char *mask = getenv("ONNXQ_CPUID_MASK");
    if (mask == NULL || *mask == '\0') return;
    if (strcmp(mask, "avx2") == 0) {
        mask_avx512 = mask_vnni = mask_amx = 1;
    } else if (strcmp(mask, "avx512-vnni") == 0) {
        mask_amx = 1;
    } else {
        fprintf(stderr, "cpuid_mask: unknown ONNXQ_CPUID_MASK=%s (avx2 or avx512-vnni)\n", mask);
        _exit(3);
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &action, NULL);
    if (set_cpuid_faulting(1) != 0) {
        perror("cpuid_mask: cpuid faulting (arch_prctl ARCH_SET_CPUID) is not available here");
        _exit(3);
    }
}
