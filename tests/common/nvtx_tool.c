/* A stand-in for an NVTX tool's injection library (what Nsight Systems points NVTX_INJECTION64_PATH at), for
 * tests/nvtx.rs. It attaches through the export table the program hands to InitializeInjectionNvtx2, takes over
 * nvtxRangePushA and nvtxRangePop, and appends one line per call to the file named by $FAKE_NVTX_LOG:
 * "modules N N N N N N" (each module's slot count, as the program reported it) once, then "push LABEL" and "pop".
 * -DREFUSE builds a tool that declines to attach; -DNO_ENTRY one without the entry point. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*fn_t)(void);
typedef const void *(*get_export_table_t)(uint32_t id);
typedef struct {
    size_t struct_size;
    int (*get_module_function_table)(int module, fn_t ***table, unsigned int *size);
} callbacks_t;

static FILE *out;

static int push_a(const char *label) { fprintf(out, "push %s\n", label); fflush(out); return 0; }
static int pop(void) { fprintf(out, "pop\n"); fflush(out); return 0; }

#ifdef NO_ENTRY
int not_an_nvtx_tool(void) { return 0; }
#else
int InitializeInjectionNvtx2(get_export_table_t get_export_table) {
#ifdef REFUSE
    (void)get_export_table;
    return 0;
#else
    const callbacks_t *cb = (const callbacks_t *)get_export_table(1);
    const char *path = getenv("FAKE_NVTX_LOG");
    if (!cb || cb->struct_size < sizeof(callbacks_t) || !path || !(out = fopen(path, "a"))) return 0;
    fprintf(out, "modules");
    for (int module = 1; module <= 6; module++) {
        fn_t **table = 0;
        unsigned int size = 0;
        if (!cb->get_module_function_table(module, &table, &size)) return 0;
        fprintf(out, " %u", size);
    }
    fprintf(out, "\n");
    fn_t **core = 0;
    unsigned int size = 0;
    if (!cb->get_module_function_table(1, &core, &size) || size < 12 || cb->get_module_function_table(7, 0, 0)) return 0;
    *core[9] = (fn_t)push_a;  /* NVTX_CBID_CORE_RangePushA */
    *core[11] = (fn_t)pop;    /* NVTX_CBID_CORE_RangePop */
    return 1;
#endif
}
#endif
